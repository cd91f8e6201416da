"""Checkpoint I/O: trainkit's storage against bare torch.save/torch.load and fs.pipe, and the async stall.

The state: an MLP of 6 Linear(2048, 2048) layers (25.2 M parameters, 100 MB) with its AdamW state after
one step (exp_avg and exp_avg_sq: 200 MB more), ~300 MB in a trainkit checkpoint dict.

    local write  CheckpointStorage.write (temp file, fsync, rename, fsync dir)  vs  torch.save(state, path)
                 (plus two references: "torch.save + fsync", what durability alone costs, and the same
                 atomic write by hand: temp file, fsync, rename, fsync dir)
    local read   CheckpointStorage.read  vs  torch.load(path, weights_only=True)
    S3 write     CheckpointStorage.write to s3:// on a local moto_server  vs  fs.pipe of the already
                 serialised bytes (plus "torch.save to memory + fs.pipe" as a reference)
    S3 read      CheckpointStorage.read  vs  torch.load(io.BytesIO(fs.cat_file(path)))
    async stall  a real Trainer (max_steps=5, save_interval=2): the time from the end of a saving step
                 (on_batch_end) to the start of the next (on_batch_start), which holds the save, with
                 async_checkpoint=True vs False; for the first save (fresh host buffers) and a later one
                 (the writer reuses the previous snapshot's buffers), the first write being complete by then

Targets: local write and read <= 1.10x, S3 write <= 1.2x, async stall (later save) <= 0.25x of a sync save.
Contenders run interleaved after a warm-up; medians with min-max; ratios are medians of per-round ratios.

    python benchmarks/checkpoint_io.py [--repeats 3] [--dir /path/on/the/disk/to/test] [--no-s3]
    python benchmarks/checkpoint_io.py --smoke
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from common import Bench, fmt_ratio, fmt_stat, interleave, package_version, print_table, summarize
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk
from trainkit.checkpoint import (
    FORMAT_KEY,
    FORMAT_VERSION,
    KEY_CALLBACKS,
    KEY_EMA,
    KEY_GRAD_SCALER,
    KEY_MODEL,
    KEY_OPTIMIZERS,
    KEY_SCHEDULERS,
    KEY_TASK,
    KEY_TRAINER,
    CheckpointStorage,
    regular_name,
)

TARGETS = {
    ("local", "write"): 1.10,
    ("local", "read"): 1.10,
    ("s3", "write"): 1.2,
    ("async", "stall, later save"): 0.25,
}
KEY, SECRET, REGION = "testing", "testing", "us-east-1"


# -- the state ------------------------------------------------------------------------------------------------


def make_net(width: int, layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def make_checkpoint(width: int, layers: int) -> dict[str, Any]:
    """A trainkit-format checkpoint dict: model, AdamW state after one step, small trainer state."""
    net = make_net(width, layers)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, width)).square().mean().backward()
    opt.step()
    return {
        FORMAT_KEY: FORMAT_VERSION,
        KEY_MODEL: net.state_dict(),
        KEY_EMA: None,
        KEY_OPTIMIZERS: [opt.state_dict()],
        KEY_SCHEDULERS: [],
        KEY_GRAD_SCALER: None,
        KEY_TRAINER: {
            "global_step": 1,
            "epoch": 0,
            "batch_in_epoch": 1,
            "rng": {"torch": torch.get_rng_state()},
        },
        KEY_CALLBACKS: {},
        KEY_TASK: {},
    }


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# -- local and S3 contenders -------------------------------------------------------------------------------


def save_fsync(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_atomic(obj: Any, path: str) -> None:
    """The atomic write by hand: a temporary name, fsync, rename over the final name, fsync the directory."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    save_fsync(obj, tmp)
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timer(fn: Callable[[], Any]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    """A real moto S3 server on a free local port, for as long as the block runs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    command = [exe] if os.path.exists(exe) else [sys.executable, "-m", "moto.server"]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
    }
    proc = subprocess.Popen(
        [*command, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode}")
            try:
                opener.open(url, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not answer within 60 s") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the async stall, measured inside a real fit ---------------------------------------------------------------


class BigTask(tk.TaskModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.net = make_net(width, layers)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


SAVE_STEPS = (2, 4)  # save_interval=2, max_steps=5: the stall of a first and of a later save


class StallProbe(tk.Callback):
    """The stall of each save: from the end of a saving step (on_batch_end, after the optimizer step) to the
    start of the next step (on_batch_start); the save runs in between. Before the second saving step it waits
    until the first file is complete, as in a run whose saves lie far apart."""

    def __init__(self, directory: str) -> None:
        self.first_file = os.path.join(directory, regular_name(SAVE_STEPS[0]))
        self.step_end: dict[int, float] = {}
        self.stalls: dict[int, float] = {}

    def on_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_end[trainer.global_step] = time.perf_counter()

    def on_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps done so far
        if step in SAVE_STEPS:
            self.stalls[step] = time.perf_counter() - self.step_end[step]
        if step == SAVE_STEPS[1] - 1:
            deadline = time.monotonic() + 300
            while not os.path.exists(self.first_file) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)  # the writer's last directory fsync


def save_stalls(width: int, layers: int, root: str, async_checkpoint: bool) -> dict[str, float]:
    directory = tempfile.mkdtemp(prefix="stall-", dir=root)
    try:
        probe = StallProbe(directory)
        loader = DataLoader(TensorDataset(torch.randn(4, width)), batch_size=2)
        trainer = tk.Trainer(
            max_steps=SAVE_STEPS[1] + 1, save_interval=SAVE_STEPS[0], checkpoint_dir=directory, log_dir=None,
            progress_bar=False, async_checkpoint=async_checkpoint, callbacks=[probe],
        )  # fmt: skip
        trainer.fit(BigTask(width, layers), loader)
        return {"first": probe.stalls[SAVE_STEPS[0]], "later": probe.stalls[SAVE_STEPS[1]]}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    def extra(parser: Any) -> None:
        parser.add_argument("--dir", default=None, help="directory on the disk to test (default: a temp dir)")
        parser.add_argument("--no-s3", action="store_true", help="skip the moto_server S3 part")

    torch.set_num_threads(1)
    bench = Bench("checkpoint_io", __doc__, default_repeats=3, smoke_repeats=1, extra_args=extra, argv=argv)
    width, layers = (64, 2) if bench.smoke else (2048, 6)
    checkpoint = make_checkpoint(width, layers)
    params = sum(p.numel() for p in checkpoint[KEY_MODEL].values())
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    file_bytes = len(data)
    del buffer
    root = tempfile.mkdtemp(prefix="tk-ckpt-bench-", dir=bench.args.dir)
    bench.settings.update(
        width=width, layers=layers, parameters=params, tensor_bytes=tensor_bytes(checkpoint),
        file_bytes=len(data), directory=root, warmup_runs=1,
        ratio="median over rounds of contender / reference in the same round",
    )  # fmt: skip
    print(
        f"## state: {params / 1e6:.2f} M parameters, {file_bytes / 2**20:.2f} MiB serialised, in {root}",
        flush=True,
    )
    table: list[list[Any]] = []

    def record(group: str, operation: str, reference: str, results: dict[str, list[float]]) -> None:
        ref = results[reference]
        for name, values in results.items():
            ratio = summarize([v / r for v, r in zip(values, ref)]) if name != reference else None
            target = TARGETS.get((group, operation)) if name.startswith("trainkit") else None
            bench.add_row({
                "group": group, "operation": operation, "contender": name, "reference": reference,
                "seconds": summarize(values), "ratio": ratio, "target": target,
                "meets_target": (ratio["median"] <= target) if (ratio and target is not None) else None,
                "samples_s": [round(v, 4) for v in values], "bytes": file_bytes,
            })  # fmt: skip
            mib_s = file_bytes / 2**20 / summarize(values)["median"]
            table.append([
                group, operation, name, fmt_stat(summarize(values), 1e3), "-" if group == "async" else f"{mib_s:.0f}",
                "1 (reference)" if ratio is None
                else f"{fmt_ratio(ratio['median'], target)} [{ratio['min']:.3f}-{ratio['max']:.3f}]",
            ])  # fmt: skip

    try:
        # Local disk.
        storage = CheckpointStorage(os.path.join(root, "trainkit"))
        bare = os.path.join(root, "bare.ckpt")
        synced = os.path.join(root, "synced.ckpt")
        atomic = os.path.join(root, "atomic.ckpt")
        print("## local write", flush=True)
        record("local", "write", "torch.save", interleave({
            "torch.save": timer(lambda: torch.save(checkpoint, bare)),
            "torch.save + fsync": timer(lambda: save_fsync(checkpoint, synced)),
            "by hand: temp file + fsync + rename": timer(lambda: save_atomic(checkpoint, atomic)),
            "trainkit write": timer(lambda: storage.write("tk.ckpt", checkpoint)),
        }, repeats=bench.repeats, warmup=1))  # fmt: skip
        print("## local read", flush=True)
        record("local", "read", "torch.load", interleave({
            "torch.load": timer(lambda: torch.load(bare, map_location="cpu", weights_only=True)),
            "trainkit read": timer(lambda: storage.read("tk.ckpt")),
        }, repeats=bench.repeats, warmup=1))  # fmt: skip
        for path in (bare, synced, atomic):
            os.remove(path)

        # S3 on a local moto_server.
        if bench.args.no_s3:
            bench.note("S3 part skipped (--no-s3)")
        elif package_version("s3fs") is None or package_version("moto") is None:
            bench.note("S3 part skipped: s3fs and moto[server] are needed (pip install 'trainkit[dev]')")
        else:
            os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
            os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
            with moto_server() as endpoint:
                import s3fs

                options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}}
                fs = s3fs.S3FileSystem(**options)
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                # (fs.mkdir would send a us-east-1 LocationConstraint, which S3 refuses)
                import boto3

                boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                             region_name=REGION).create_bucket(Bucket=bucket)  # fmt: skip
                s3_storage = CheckpointStorage(f"s3://{bucket}/trainkit", options)

                def save_and_pipe() -> None:
                    buf = io.BytesIO()
                    torch.save(checkpoint, buf)
                    fs.pipe(f"{bucket}/saved.ckpt", buf.getvalue())

                print("## S3 write", flush=True)
                record("s3", "write", "fs.pipe (bytes ready)", interleave({
                    "fs.pipe (bytes ready)": timer(lambda: fs.pipe(f"{bucket}/bare.ckpt", data)),
                    "torch.save to memory + fs.pipe": timer(save_and_pipe),
                    "trainkit write": timer(lambda: s3_storage.write("tk.ckpt", checkpoint)),
                }, repeats=bench.repeats, warmup=1))  # fmt: skip
                print("## S3 read", flush=True)
                record("s3", "read", "fs.cat + torch.load", interleave({
                    "fs.cat + torch.load": timer(lambda: torch.load(
                        io.BytesIO(fs.cat_file(f"{bucket}/bare.ckpt")), map_location="cpu", weights_only=True)),
                    "trainkit read": timer(lambda: s3_storage.read("tk.ckpt")),
                }, repeats=bench.repeats, warmup=1))  # fmt: skip
        data = b""  # free the 300 MB before the stall runs

        # The stall a save puts into training: a first save, and a later one (async reuses host buffers).
        print("## async stall", flush=True)
        stalls = interleave({
            "sync save": lambda: save_stalls(width, layers, root, async_checkpoint=False),
            "trainkit async save": lambda: save_stalls(width, layers, root, async_checkpoint=True),
        }, repeats=bench.repeats, warmup=1)  # fmt: skip
        for which in ("first", "later"):
            record(
                "async",
                f"stall, {which} save",
                "sync save",
                {k: [r[which] for r in v] for k, v in stalls.items()},
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    print_table(["group", "operation", "contender", "ms median (min-max)", "MiB/s", "ratio [min-max]"], table)
    bench.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

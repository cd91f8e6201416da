"""Sharded (DCP) checkpoints: real gloo ranks sharding a model with FSDP2, a real moto_server, crafted files.

Process launches cost seconds of torch import each, so there are four: ``dcp_worker.py main`` (2 ranks:
save locally and on S3, load back into the same world size), ``reshard`` (a world of 1 loads what 2 ranks
saved) and ``kill`` twice (local, S3). The ranks are started here directly with the launcher's
environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), so that the test sees each rank's exit status.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as stock_dcp
from dcp_worker import Net

import trainkit as tk
from trainkit.__main__ import main as cli
from trainkit.checkpoint import CheckpointStorage
from trainkit.dcp import (
    complete_checkpoints,
    delete_checkpoint_dir,
    is_complete,
    latest_complete,
    load_dcp,
    load_full,
    save_dcp,
)

try:  # a real moto_server for the S3 cases (module-scoped fixture of test_s3)
    from test_s3 import KEY, REGION, SECRET, boto3, endpoint  # noqa: F401
except pytest.skip.Exception:  # s3fs or boto3 missing: the S3 cases skip, the rest run

    @pytest.fixture(scope="module")
    def endpoint():
        pytest.skip("s3fs/boto3 are not installed")


WORKER = str(Path(__file__).with_name("dcp_worker.py"))
LAUNCH_TIMEOUT = 180  # seconds for one launch; a hang kills every rank and fails
RANK_FILES = [".metadata", "__0_0.distcp", "__1_0.distcp"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, *args: str, world: int = 2, s3: str | None = None) -> list[tuple[int, str]]:
    """Start ``world`` ranks of ``dcp_worker.py MODE ARGS`` and wait for all; once one fails the others
    get 15 s to notice before they are killed. Returns each rank's (exit status, output)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
            DCP_WORKER_TIMEOUT=str(LAUNCH_TIMEOUT - 30), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
        )  # fmt: skip
        if s3:
            env.update(DCP_TEST_S3_ENDPOINT=s3, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, mode, *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )  # fmt: skip
        )
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 15):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            if now > deadline:
                outs = "\n".join((p.communicate()[0] or "")[-3000:] for p in procs)
                pytest.fail(f"dcp_worker.py {mode} did not finish within {LAUNCH_TIMEOUT} s:\n{outs}")
        time.sleep(0.05)
    return [(p.returncode, p.communicate()[0]) for p in procs]


def check_ok(results: list[tuple[int, str]]) -> None:
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{out[-6000:]}"


def s3_options(url: str) -> dict[str, Any]:
    return {"client_kwargs": {"endpoint_url": url}, "key": "testing", "secret": "testing"}


def new_bucket(url: str) -> tuple[Any, str]:
    client = boto3.client(
        "s3", endpoint_url=url, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    )
    bucket = f"trainkit-dcp-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def bucket_keys(client: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Equal nested values: tensors bitwise with dtype, tuples stay tuples, dict keys keep their types."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a.keys()) == list(b.keys()), f"{where}: {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def load_pt(path: Path) -> Any:
    return torch.load(path, weights_only=True)


class Sentinel:
    """Unpickling it creates a file: proof that code from a checkpoint ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def small_checkpoint(step: int = 1) -> dict[str, Any]:
    torch.manual_seed(step)
    net = Net()
    return {
        "trainkit_format": 1,
        "model": net.state_dict(),
        "ema": None,
        "optimizers": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3, 4, 5]}]}],
        "schedulers": [],
        "trainer": {"global_step": step, "history": [], "rng": {"python": (3, (1, 2), None)}},
        "callbacks": {},
        "task": {},
    }


# -- the 2-rank run, shared --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> SimpleNamespace:
    """``dcp_worker.py main`` on 2 ranks: FSDP2-sharded state saved locally and (with moto) on S3."""
    out = tmp_path_factory.mktemp("dcp_main")
    try:
        s3 = request.getfixturevalue("endpoint")
    except pytest.skip.Exception:
        s3 = None
    client = bucket = s3_url = None
    args = [str(out)]
    if s3:
        client, bucket = new_bucket(s3)
        s3_url = f"s3://{bucket}/run"
        args.append(s3_url)
    check_ok(launch("main", *args, s3=s3))
    return SimpleNamespace(
        out=out, ckpt=out / "ckpt", reference=load_pt(out / "reference.pt"), s3=s3, client=client,
        bucket=bucket, s3_url=s3_url,
    )  # fmt: skip


def check_report(run: SimpleNamespace, tag: str) -> None:
    ref = run.reference
    for rank in (0, 1):
        report = load_pt(run.out / f"{tag}_rank{rank}.pt")
        assert report["same_object"], "load_dcp must fill and keep the caller's own DTensors"
        assert_same(report["model"], ref["model"], f"rank {rank} model")
        assert_same(report["optim"], ref["optimizers"][0], f"rank {rank} optimizer")
        assert_same(report["ema"], ref["ema"], f"rank {rank} ema")
        for key in ("trainer", "schedulers", "callbacks", "task", "grad_scaler"):
            assert_same(report["rest"][key], ref[key], f"rank {rank} {key}")
        assert report["rest"]["trainer"]["written_by"] == 0  # rank 0's python values, on every rank
        # Each rank got back exactly the shards it saved, uneven ones included.
        assert_same(report["shards"], load_pt(run.out / f"saved_shards_rank{rank}.pt"), f"rank {rank} shards")
    shards = [load_pt(run.out / f"saved_shards_rank{r}.pt")["model"] for r in (0, 1)]
    assert [tuple(s["b.weight"].shape) for s in shards] == [(2, 6), (1, 6)]
    assert [tuple(s["c.weight"].shape) for s in shards] == [(1, 3), (0, 3)]


def test_sharded_save_is_one_directory_and_loads_into_the_same_world_size(run):
    assert sorted(os.listdir(run.ckpt)) == ["step_000000002"]  # no temporary directory left
    assert sorted(os.listdir(run.ckpt / "step_000000002")) == RANK_FILES
    for rank in (0, 1):
        assert load_pt(run.out / f"saved_rank{rank}.pt")["location"] == str(run.ckpt / "step_000000002")
    check_report(run, "local")
    storage = CheckpointStorage(run.ckpt)
    assert complete_checkpoints(storage) == {"step_000000002": 2}
    assert latest_complete(storage) == "step_000000002"


def test_one_plain_process_reads_full_tensors(run):
    directory = run.ckpt / "step_000000002"
    assert_same(load_full(directory), run.reference, "load_full")
    assert_same(tk.load_checkpoint(directory), run.reference, "load_checkpoint")
    assert_same(tk.load_checkpoint(str(directory) + "/"), run.reference, "load_checkpoint with a slash")
    assert_same(load_full(directory, keys=("model",)), {"model": run.reference["model"]}, "keys")
    model = tk.load_weights(Net(), directory)
    assert_same(model.state_dict(), run.reference["model"], "load_weights")
    ema = tk.load_weights(Net(), directory, ema=True)
    assert_same(ema.state_dict(), run.reference["ema"]["state_dict"], "load_weights ema")


def test_sharded_checkpoint_on_s3(run):
    if run.s3 is None:
        pytest.skip("no moto_server")
    name = "best_step_000000002"
    assert bucket_keys(run.client, run.bucket) == [f"run/{name}/{f}" for f in RANK_FILES]
    check_report(run, "s3")
    options = s3_options(run.s3)
    url = f"{run.s3_url}/{name}"
    assert_same(load_full(url, options), run.reference, "load_full on s3")
    assert_same(tk.load_checkpoint(url, storage_options=options), run.reference, "load_checkpoint on s3")
    weights = tk.load_weights(Net(), url, ema=True, storage_options=options)
    assert_same(weights.state_dict(), run.reference["ema"]["state_dict"], "load_weights on s3")
    assert cli(["convert", url, "best.ckpt", "--storage-options", json.dumps(options)]) == 0
    assert_same(torch.load("best.ckpt", weights_only=True), run.reference, "converted from s3")
    storage = CheckpointStorage(run.s3_url, options)
    assert complete_checkpoints(storage) == {name: 2}
    delete_checkpoint_dir(storage, name)
    assert bucket_keys(run.client, run.bucket) == [] and complete_checkpoints(storage) == {}


def test_weights_and_optimizer_state_load_into_another_world_size(run):
    check_ok(launch("reshard", str(run.out), str(run.ckpt / "step_000000002"), world=1))
    report = load_pt(run.out / "reshard_rank0.pt")
    assert_same(report["model"], run.reference["model"], "model")
    assert_same(report["optim"], run.reference["optimizers"][0], "optimizer")
    assert_same(report["shards"]["model"], run.reference["model"], "a world of 1 holds everything")
    assert report["wrong_shape"] == (
        f"entry 'model.a.weight' of '{run.ckpt / 'step_000000002'}' has shape (6, 4); the state_dict's "
        "DTensor has (7, 4)"
    )


# -- SIGKILL in the middle of a sharded save ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_during_a_sharded_save_leaves_the_earlier_one(where, tmp_path, request):
    options: dict[str, Any] = {}
    s3 = None
    if where == "s3":
        s3 = request.getfixturevalue("endpoint")
        client, bucket = new_bucket(s3)
        url, options = f"s3://{bucket}/run", s3_options(s3)
    else:
        url = str(tmp_path / "ckpt")
    results = launch("kill", url, s3=s3)
    assert results[0][0] == -signal.SIGKILL, results[0][1][-3000:]
    assert results[1][0] != 0  # its peer vanished in the middle of a collective
    storage = CheckpointStorage(url, options)
    if where == "local":
        names = sorted(os.listdir(url))
        assert names[1] == "step_000000001" and names[0].startswith(".step_000000002.tmp-"), names
        assert sorted(os.listdir(Path(url) / names[0])) == [
            "__0_0.distcp",
            "__1_0.distcp",
        ]  # data, no .metadata
    else:
        assert bucket_keys(client, bucket) == [
            *(f"run/step_000000001/{f}" for f in RANK_FILES),
            "run/step_000000002/__0_0.distcp",
            "run/step_000000002/__1_0.distcp",
        ]
        with pytest.raises(tk.CheckpointError, match="incomplete"):
            load_full(f"{url}/step_000000002", options)
        assert not is_complete(storage.fs, storage.path("step_000000002"))
    assert complete_checkpoints(storage) == {"step_000000001": 1}
    assert latest_complete(storage) == "step_000000001"
    earlier = load_full(f"{url}/step_000000001", options)
    assert earlier["trainer"]["global_step"] == 1 and earlier["trainer"]["written_by"] == 0
    # Saving step 2 again (one process now) replaces the leftovers.
    save_dcp(small_checkpoint(2), storage, "step_000000002")
    assert complete_checkpoints(storage) == {"step_000000001": 1, "step_000000002": 2}
    assert load_full(f"{url}/step_000000002", options)["trainer"]["global_step"] == 2
    if where == "local":
        assert sorted(os.listdir(url)) == ["step_000000001", "step_000000002"]


# -- safety ------------------------------------------------------------------------------------------------


def test_a_crafted_metadata_runs_no_code(tmp_path, capsys):
    storage = CheckpointStorage(tmp_path / "ckpt")
    save_dcp(small_checkpoint(), storage, "step_000000001")
    directory = tmp_path / "ckpt" / "step_000000001"
    sentinel = tmp_path / "sentinel"
    (directory / ".metadata").write_bytes(pickle.dumps(Sentinel(str(sentinel))))
    # The payload is live: DCP's own reader runs it.
    stock_dcp.FileSystemReader(str(directory)).read_metadata().close()  # what it made is an open file
    assert sentinel.exists()
    sentinel.unlink()
    metadata = f"{directory}/.metadata"
    for load in (
        lambda: tk.load_checkpoint(directory),
        lambda: tk.load_weights(Net(), directory),
        lambda: load_full(directory),
        lambda: load_dcp({}, storage, "step_000000001"),
    ):
        with pytest.raises(tk.CheckpointError, match=f"refused '{metadata}'.*no code from it was run"):
            load()
        assert not sentinel.exists()
    assert cli(["convert", str(directory), str(tmp_path / "out.ckpt")]) == 1
    assert f"refused '{metadata}'" in capsys.readouterr().err
    assert not sentinel.exists() and not (tmp_path / "out.ckpt").exists()


def test_metadata_pointing_outside_its_directory_is_refused(tmp_path):
    storage = CheckpointStorage(tmp_path / "ckpt")
    save_dcp(small_checkpoint(), storage, "step_000000001")
    meta = tmp_path / "ckpt" / "step_000000001" / ".metadata"
    md = pickle.loads(meta.read_bytes())  # written by trainkit just now: safe to unpickle here
    for info in md.storage_data.values():
        info.relative_path = "../../secret.distcp"
    meta.write_bytes(pickle.dumps(md))
    with pytest.raises(tk.CheckpointError, match="outside its directory"):
        load_full(tmp_path / "ckpt" / "step_000000001")


def test_a_crafted_entry_runs_no_code(tmp_path):
    directory = str(tmp_path / "evil")
    sentinel = tmp_path / "sentinel"
    with pytest.warns(UserWarning):  # DCP's own writer, one process: it pickles whatever it is given
        stock_dcp.save(
            {"trainkit_format": 1, "task": Sentinel(str(sentinel))}, checkpoint_id=directory, no_dist=True
        )
    assert not sentinel.exists()
    loaded: dict[str, Any] = {"task": None}
    with pytest.warns(UserWarning):  # The payload is live: DCP's own load runs it.
        stock_dcp.load(loaded, checkpoint_id=directory, no_dist=True)
    loaded["task"].close()
    assert sentinel.exists()
    sentinel.unlink()
    with pytest.raises(
        tk.CheckpointError, match=f"refused entry 'task' of '{directory}'.*no code from it was run"
    ):
        load_full(directory)
    assert not sentinel.exists()


def test_a_checkpoint_written_by_plain_dcp_reads_as_nested_dicts(tmp_path):
    directory = str(tmp_path / "plain")
    state = {
        "model": {"w": torch.arange(6.0).reshape(2, 3)},
        "optimizers": [{"state": {"m": torch.ones(2)}}, {"state": {"m": torch.zeros(1)}}],
        "extra": {"epoch": 3, "names": ["a", "b"]},
    }
    with pytest.warns(UserWarning):
        stock_dcp.save(state, checkpoint_id=directory, no_dist=True)  # pathlib paths in its metadata
    assert_same(load_full(directory), state, "plain DCP")


def test_bad_input_raises_before_anything_is_written(tmp_path):
    storage = CheckpointStorage(tmp_path / "ckpt")
    bad = small_checkpoint()
    bad["task"] = {"fn": print}
    with pytest.raises(TypeError, match=r"state_dict\['task'\]\['fn'\] holds a builtins"):
        save_dcp(bad, storage, "step_000000001")
    with pytest.raises(ValueError, match=r"name='\.hidden' is not valid"):
        save_dcp(small_checkpoint(), storage, ".hidden")
    with pytest.raises(ValueError, match="name='a/b' is not valid"):
        save_dcp(small_checkpoint(), storage, "a/b")
    with pytest.raises(TypeError, match="storage=.* is not valid"):
        save_dcp(small_checkpoint(), str(tmp_path), "step_000000001")  # type: ignore[arg-type]
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_full(tmp_path / "nothing")
    (tmp_path / "ckpt" / "step_000000003").mkdir(parents=True)
    (tmp_path / "ckpt" / "step_000000003" / "__0_0.distcp").write_bytes(b"partial")
    with pytest.raises(tk.CheckpointError, match="incomplete: it has no .metadata"):
        tk.load_checkpoint(tmp_path / "ckpt" / "step_000000003")
    assert complete_checkpoints(storage) == {}


def test_local_delete_and_replace(tmp_path):
    storage = CheckpointStorage(tmp_path / "ckpt")
    save_dcp(small_checkpoint(1), storage, "best_step_000000001")
    save_dcp(small_checkpoint(2), storage, "best_step_000000002")
    assert complete_checkpoints(storage) == {"best_step_000000001": 1, "best_step_000000002": 2}
    delete_checkpoint_dir(storage, "best_step_000000001")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["best_step_000000002"]
    save_dcp(small_checkpoint(3), storage, "best_step_000000002")  # an existing name is replaced whole
    assert load_full(tmp_path / "ckpt" / "best_step_000000002")["trainer"]["global_step"] == 3
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["best_step_000000002"]
    save_dcp(small_checkpoint(3), storage, "step_000000002")
    assert latest_complete(storage) == "step_000000002"  # a tie goes to the regular one


def test_saving_a_name_again_on_s3_replaces_it(endpoint):
    client, bucket = new_bucket(endpoint)
    storage = CheckpointStorage(f"s3://{bucket}/run", s3_options(endpoint))
    save_dcp(small_checkpoint(1), storage, "step_000000001")
    save_dcp(small_checkpoint(2), storage, "step_000000001")
    assert bucket_keys(client, bucket) == ["run/step_000000001/.metadata", "run/step_000000001/__0_0.distcp"]
    again = load_full(f"s3://{bucket}/run/step_000000001", s3_options(endpoint))
    assert_same(again, small_checkpoint(2), "replaced")


# -- conversion --------------------------------------------------------------------------------------------


def test_convert_round_trip(run, tmp_path):
    src = run.ckpt / "step_000000002"
    single = tmp_path / "converted.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "trainkit", "convert", str(src), str(single)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {single}"
    assert sorted(os.listdir(tmp_path)) == ["converted.ckpt"]  # written atomically: no temporary left
    assert_same(torch.load(single, weights_only=True), run.reference, "single file")
    back = tmp_path / "sharded" / "step_000000002"
    assert Path.cwd() == tmp_path and cli(["convert", str(single), "sharded/step_000000002"]) == 0  # relative
    assert sorted(os.listdir(back)) == [".metadata", "__0_0.distcp"]
    assert_same(load_full(back), run.reference, "sharded again")


def test_convert_errors(run, tmp_path, capsys):
    src = str(run.ckpt / "step_000000002")
    existing = tmp_path / "there.ckpt"
    existing.write_bytes(b"keep")
    assert cli(["convert", src, str(existing)]) == 1
    assert "already exists" in capsys.readouterr().err and existing.read_bytes() == b"keep"
    assert cli(["convert", str(tmp_path / "missing"), str(tmp_path / "x.ckpt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli(["convert", src, str(tmp_path / "y.ckpt"), "--storage-options", "[1]"])
    assert exit_info.value.code == 2 and "expected a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli([])
    assert exit_info.value.code == 2 and "usage: python -m trainkit" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["there.ckpt"]

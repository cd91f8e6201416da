"""Storage faults: an object store that drops connections, and the temporary files of killed writes.

The store is a real moto_server reached through ``FlakyProxy``, a TCP proxy on 127.0.0.1 that, while
down, resets every connection (new ones when accepted, open ones when bytes arrive). The window is opened
by the test just before a save and closed by trainkit's own retry warning, so the first try always fails
and the second always succeeds, whatever the timing. The client's own retries are turned off here
(botocore's ``total_max_attempts=1``, s3fs's ``retries=1``) so that each trainkit try is a few requests; with
their defaults one try spent ~23 s in their backoff before trainkit saw the failure.

    python tests/test_faults_io.py killed-write DIR MARKER    (a write that a test SIGKILLs mid-way)
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import trainkit as tk
from trainkit.checkpoint import CheckpointStorage, is_temporary_name, temporary_name

RETRY_LOGGER = "trainkit"


# -- a store that drops connections ------------------------------------------------------------------------


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port``, one thread per direction of a connection.
    While down it resets every connection: a new one as soon as it is accepted, an open one as soon as
    bytes arrive on it in either direction (so pooled keep-alive connections fail too)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.resets = 0
        self._down = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        self._down.set()

    def up(self) -> None:
        self._down.clear()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in list(self._open):
                self._abort(sock)

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        """Close with a reset (RST), not a FIN; wakes a thread blocked reading it."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        sock.close()

    def _reset(self, client: socket.socket, upstream: socket.socket | None = None) -> None:
        with self._lock:
            self.resets += 1
            self._open.difference_update((client, upstream))
        self._abort(client)
        if upstream is not None:
            self._abort(upstream)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self._down.is_set():
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                self._reset(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, client, upstream), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self._down.is_set():
                    self._reset(client, upstream)
                    return
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class CloseWindowOnRetry(logging.Handler):
    """Brings the proxy back up when trainkit logs its first retry warning; keeps every record."""

    def __init__(self, proxy: FlakyProxy | None) -> None:
        super().__init__(logging.WARNING)
        self.proxy = proxy
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "failed (try" not in record.getMessage():
            return  # another of trainkit's warnings
        self.records.append(record)
        if self.proxy is not None:
            self.proxy.up()

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def retry_log():
    """Collects trainkit's retry warnings; ``retry_log.proxy = p`` makes the first one bring ``p`` up."""
    handler = CloseWindowOnRetry(None)
    logger = logging.getLogger(RETRY_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def store(s3, monkeypatch):
    """A bucket on moto_server, reached through a FlakyProxy; trainkit's retries back off 10 ms instead of
    1 s, and the client makes one request per call (s3fs's ``retries`` is a class attribute, not an option)."""
    client, bucket, options = s3
    endpoint_port = int(options["client_kwargs"]["endpoint_url"].rsplit(":", 1)[1])
    proxy = FlakyProxy(endpoint_port)
    monkeypatch.setattr(CheckpointStorage, "retry_backoff_s", 0.01)
    monkeypatch.setattr(importlib.import_module("s3fs").S3FileSystem, "retries", 1)
    through_proxy = {
        **options,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"},
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
    }
    try:
        yield client, bucket, through_proxy, proxy
    finally:
        proxy.close()


def checkpoint(step: int) -> dict:
    return {
        "trainkit_format": 1,
        "model": {"w": torch.arange(4.0) + step},
        "optimizers": [],
        "schedulers": [],
        "trainer": {"global_step": step},
    }


# The moto fixtures live in test_s3.py, which skips itself without s3fs or boto3: then only the S3 tests
# here are skipped.
try:
    from test_s3 import endpoint, get, keys, s3  # noqa: E402, F401  (fixtures and helpers)
except pytest.skip.Exception as missing:
    reason = str(missing)

    @pytest.fixture
    def s3():
        pytest.skip(reason)


@pytest.mark.timeout(120)
def test_a_write_in_a_window_of_resets_is_retried_and_lands(store, retry_log):
    client, bucket, options, proxy = store
    storage = CheckpointStorage(f"s3://{bucket}/run", options)
    storage.write("step_000000002.ckpt", checkpoint(2))
    retry_log.proxy = proxy
    proxy.down()
    url = storage.write("step_000000004.ckpt", checkpoint(4))
    assert url == f"s3://{bucket}/run/step_000000004.ckpt"
    assert proxy.resets >= 1
    assert len(retry_log.messages) == 1
    assert f"'{url}' failed (try 1 of 4:" in retry_log.messages[0] and "retrying in 0.01 s" in retry_log.messages[0]
    assert retry_log.records[0].levelno == logging.WARNING
    assert keys(client, bucket) == ["run/step_000000002.ckpt", "run/step_000000004.ckpt"]
    stored = torch.load(io.BytesIO(get(client, bucket, "run/step_000000004.ckpt")), weights_only=True)
    assert torch.equal(stored["model"]["w"], checkpoint(4)["model"]["w"])


@pytest.mark.timeout(120)
def test_a_store_that_stays_down_gives_a_checkpoint_error_after_the_retries(store, retry_log):
    client, bucket, options, proxy = store
    storage = CheckpointStorage(f"s3://{bucket}/run", options)
    storage.write("step_000000002.ckpt", checkpoint(2))
    before = get(client, bucket, "run/step_000000002.ckpt")
    proxy.down()
    url = f"s3://{bucket}/run/step_000000004.ckpt"
    with pytest.raises(tk.CheckpointError, match=f"could not write checkpoint '{url}': the store failed 4 times"):
        storage.write("step_000000004.ckpt", checkpoint(4))
    assert [m.split(" (try ")[1][:6] for m in retry_log.messages] == ["1 of 4", "2 of 4", "3 of 4"]
    assert all("retrying in" in m for m in retry_log.messages)
    assert keys(client, bucket) == ["run/step_000000002.ckpt"]  # the earlier checkpoint, byte for byte
    assert get(client, bucket, "run/step_000000002.ckpt") == before


@pytest.mark.timeout(120)
def test_errors_that_retrying_cannot_fix_are_raised_at_once(s3, retry_log):
    client, bucket, options = s3
    with pytest.raises(OSError, match="bucket is not valid"):  # the store's answer: EINVAL
        CheckpointStorage("s3://b/run", options).write("step_000000002.ckpt", checkpoint(2))
    with pytest.raises(TypeError, match="retries"):  # a bad option: a bug in the call, not the store
        CheckpointStorage(f"s3://{bucket}/run", {**options, "retries": 1}).write("x.ckpt", checkpoint(2))
    assert retry_log.messages == []
    assert keys(client, bucket) == []


# -- the same faults through Trainer.fit --------------------------------------------------------------------


class StoreDownAt(tk.Callback):
    """Takes the store down after optimizer step ``step``, just before that step's save, once every earlier
    save has landed (an asynchronous one may still be in flight)."""

    def __init__(self, proxy: FlakyProxy, step: int, client, bucket: str) -> None:
        self.proxy, self.step, self.client, self.bucket = proxy, step, client, bucket

    def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            earlier = [f"run/step_{s:09d}.ckpt" for s in range(2, self.step, 2)]
            deadline = time.monotonic() + 60
            while keys(self.client, self.bucket) != earlier:
                assert time.monotonic() < deadline, keys(self.client, self.bucket)
                time.sleep(0.01)
            self.proxy.down()


def fit_on_store(bucket: str, options: dict, callbacks: list, max_steps: int, async_checkpoint: bool = False):
    from helpers import TinyClassifier, make_loader, quiet

    trainer = tk.Trainer(
        run_mode="step", max_steps=max_steps, save_interval=2, async_checkpoint=async_checkpoint,
        callbacks=callbacks, **quiet(checkpoint_dir=f"s3://{bucket}/run", storage_options=options),
    )  # fmt: skip
    return trainer, trainer.fit(TinyClassifier(), make_loader(64, batch_size=4))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("async_checkpoint", [False, True])
def test_fit_rides_out_a_window_of_resets(store, retry_log, async_checkpoint):
    client, bucket, options, proxy = store
    retry_log.proxy = proxy
    trainer, result = fit_on_store(bucket, options, [StoreDownAt(proxy, 4, client, bucket)], 6, async_checkpoint)
    assert (result.stop_reason, result.global_step) == ("max_steps", 6)
    assert len(retry_log.messages) == 1 and "step_000000004.ckpt' failed (try 1 of 4:" in retry_log.messages[0]
    assert keys(client, bucket) == [f"run/step_{s:09d}.ckpt" for s in (2, 4, 6)]
    for step in (2, 4, 6):
        ckpt = tk.load_checkpoint(f"s3://{bucket}/run/step_{step:09d}.ckpt", storage_options=options)
        assert ckpt["trainer"]["global_step"] == step


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("async_checkpoint", "max_steps", "raised_at"),
    [(False, 8, 4), (True, 8, 6), (True, 4, 4)],
    ids=["sync", "async-next-save", "async-end-of-fit"],
)
def test_fit_on_a_store_that_stays_down_raises_naming_the_url(store, async_checkpoint, max_steps, raised_at):
    """Synchronous: at the failing save. Asynchronous: at the next save, or at the end of fit."""
    client, bucket, options, proxy = store
    seen: list[int] = []

    class Watch(tk.Callback):
        def on_exception(self, trainer, module, exc):
            seen.append(trainer.global_step)

    url = f"s3://{bucket}/run/step_000000004.ckpt"
    with pytest.raises(tk.CheckpointError, match=f"could not write checkpoint '{url}': the store failed 4 times"):
        fit_on_store(bucket, options, [StoreDownAt(proxy, 4, client, bucket), Watch()], max_steps, async_checkpoint)
    assert seen == [raised_at]
    assert keys(client, bucket) == ["run/step_000000002.ckpt"]
    proxy.up()
    earlier = tk.load_checkpoint(f"s3://{bucket}/run/step_000000002.ckpt", storage_options=options)
    assert earlier["trainer"]["global_step"] == 2


# -- leftovers of killed writes -----------------------------------------------------------------------------


class BlocksWhilePickled:
    """Serialised inside the write, after its temporary file was opened: says so, then waits for the kill."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).write_text("writing")
        time.sleep(600)
        raise AssertionError("not killed")


def killed_write(directory: str, marker: str) -> None:
    storage = CheckpointStorage(directory)
    storage.write("step_000000002.ckpt", checkpoint(2))
    storage.write("step_000000004.ckpt", {**checkpoint(4), "task": BlocksWhilePickled(marker)})


@pytest.mark.timeout(120)
def test_remove_temporaries_removes_a_killed_writes_file_and_nothing_else(tmp_path):
    directory, marker = tmp_path / "ckpt", tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, __file__, "killed-write", str(directory), str(marker)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = [n for n in os.listdir(directory) if n.startswith(".")]
    assert len(left) == 1 and left[0].startswith(".step_000000004.ckpt.tmp-") and is_temporary_name(left[0])
    # Names that only look like trainkit's: a user's hidden file, other temp conventions, a short suffix.
    decoys = [".hidden", "notes.tmp-" + "a" * 32, ".step_000000006.ckpt.tmp-123", "step_000000008.ckpt.tmp-" + "b" * 32,
              ".step_000000010.ckpt.tmp-" + "C" * 32]  # fmt: skip
    for name in decoys:
        (directory / name).write_text("not trainkit's")
    storage = CheckpointStorage(directory)
    assert storage.remove_temporaries() == [str(directory / left[0])]
    assert sorted(os.listdir(directory)) == sorted(["step_000000002.ckpt", *decoys])
    assert tk.load_checkpoint(directory / "step_000000002.ckpt")["trainer"]["global_step"] == 2
    assert storage.remove_temporaries() == []


class ListAtStart(tk.Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.names: list[str] = []

    def on_fit_start(self, trainer, module):
        self.names = sorted(os.listdir(self.directory))


@pytest.mark.timeout(60)
def test_fit_removes_leftovers_of_killed_writes_before_the_first_step(tmp_path, caplog):
    from helpers import TinyClassifier, make_loader, quiet

    directory = tmp_path / "ckpt"

    def fit(max_steps: int, callbacks=(), ckpt_path=None):
        trainer = tk.Trainer(run_mode="step", max_steps=max_steps, save_interval=2, callbacks=list(callbacks),
                             **quiet(checkpoint_dir=str(directory)))  # fmt: skip
        return trainer.fit(TinyClassifier(), make_loader(64, batch_size=4), ckpt_path=ckpt_path)

    fit(2)
    ours = {
        temporary_name("step_000000004.ckpt"): b"half a checkpoint",  # a killed single-file write
        temporary_name("step_000000006") + "/__0_0.distcp": b"shard",  # a killed sharded save (a directory)
        ".step_000000002.trash-" + "d" * 32 + "/.metadata": b"old copy",  # a sharded save's moved-aside copy
    }
    others = {
        "notes.txt": b"not ours",
        ".hidden": b"not ours",
        ".step_000000004.ckpt.tmp-0123456789abcdef": b"not our pattern: 16 hex digits",
    }
    for name, data in {**ours, **others}.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    caplog.set_level(logging.INFO, logger="trainkit")
    seen = ListAtStart(directory)
    result = fit(4, [seen], ckpt_path="last")
    assert result.global_step == 4
    assert seen.names == sorted(["step_000000002.ckpt", *others])  # gone before on_fit_start
    assert sorted(os.listdir(directory)) == sorted(["step_000000002.ckpt", "step_000000004.ckpt", *others])
    assert all((directory / name).read_bytes() == data for name, data in others.items())
    removed = [r for r in caplog.records if "temporary file(s)" in r.getMessage()]
    assert len(removed) == 1 and removed[0].levelno == logging.WARNING
    tops = sorted(str(directory / name.split("/")[0]) for name in ours)
    assert removed[0].getMessage().endswith(", ".join(tops)), removed[0].getMessage()

    caplog.clear()
    fit(4, ckpt_path="last")  # nothing left over: nothing said
    assert not [r for r in caplog.records if "temporary file(s)" in r.getMessage()]


@pytest.mark.timeout(60)
def test_remove_temporaries_on_s3(s3):
    client, bucket, options = s3
    leftover = "run/" + temporary_name("step_000000004.ckpt")
    for key in (leftover, "run/step_000000002.ckpt", "run/.hidden"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    storage = CheckpointStorage(f"s3://{bucket}/run", options)
    assert storage.remove_temporaries() == [f"s3://{bucket}/{leftover}"]
    assert keys(client, bucket) == ["run/.hidden", "run/step_000000002.ckpt"]


def test_temporary_names_are_the_ones_writes_use():
    names = {temporary_name("best.ckpt") for _ in range(3)}
    assert len(names) == 3 and all(n.startswith(".best.ckpt.tmp-") and is_temporary_name(n) for n in names)
    assert is_temporary_name(".step_000000004.trash-" + "0" * 32)  # a sharded save's old copy, moved aside
    assert not any(is_temporary_name(n) for n in ("best.ckpt", ".best.ckpt", ".best.ckpt.tmp-", "x.tmp-" + "0" * 32))


if __name__ == "__main__":
    if sys.argv[1] == "killed-write":
        killed_write(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")

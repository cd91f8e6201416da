"""Checkpoints on S3 through s3fs, against a real moto_server started on 127.0.0.1 for this module."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
import torch
from helpers import TinyClassifier, make_loader, quiet
from test_checkpoint import REGULAR, SCRIPT, Saboteur, assert_tree_equal
from test_early_stopping import Scripted

import trainkit as tk

pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")

KEY, SECRET, REGION = "testing", "testing", "us-east-1"
MOTO_SERVER = os.path.join(os.path.dirname(sys.executable), "moto_server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(**extra_env: str):
    """A real moto S3 server on a free local port, yielding its URL; stopped on exit. ``extra_env`` sets
    moto's own switches (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT="0"`` makes it check credentials)."""
    if not os.path.exists(MOTO_SERVER):
        pytest.skip("moto_server (moto[server]) is not installed in this environment")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        **extra_env,
    }
    proc = subprocess.Popen(
        [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode}")
            try:
                opener.open(url, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answered (a server that checks credentials answers 403)
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


@pytest.fixture(scope="module")
def endpoint():
    """A real moto S3 server on a free local port; stopped when the module's tests are done."""
    with moto_server() as url:
        yield url


@pytest.fixture
def s3(endpoint, monkeypatch):
    """A fresh bucket on the server, the boto3 client to inspect it, and trainkit's storage_options."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    )
    bucket = f"trainkit-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    options = {"client_kwargs": {"endpoint_url": endpoint}, "key": KEY, "secret": SECRET}
    return client, bucket, options


def keys(client, bucket: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=bucket)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def get(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.timeout(120)
def test_best_and_regular_checkpoints_on_s3(s3):
    client, bucket, options = s3
    url = f"s3://{bucket}/run"
    module = Scripted({"loss": SCRIPT})
    trainer = tk.Trainer(
        run_mode="step", max_steps=12, eval_interval=2, save_interval=3, use_ema=True, ema_decay=0.9,
        **quiet(checkpoint_dir=url, storage_options=options),
    )  # fmt: skip
    result = trainer.fit(module, make_loader(32), make_loader(8))
    # The bucket as boto3 sees it: every regular file, exactly one best, nothing else.
    assert keys(client, bucket) == [f"run/{n}" for n in ["best.ckpt", *REGULAR]]
    assert result.best_checkpoint == trainer.best_checkpoint_path == f"{url}/best.ckpt"
    assert result.best_step == 8
    # Each object is a plain weights_only torch file...
    for name in REGULAR:
        obj = torch.load(io.BytesIO(get(client, bucket, f"run/{name}")), weights_only=True)
        assert obj["trainer"]["global_step"] == int(name[5:14])
    # ...and trainkit loads them back by URL.
    best = tk.load_checkpoint(result.best_checkpoint, storage_options=options)
    assert (best["trainer"]["global_step"], best["trainer"]["best"]["metric"]) == (8, 0.4)
    last = tk.load_checkpoint(f"{url}/step_000000012.ckpt", storage_options=options)
    assert_tree_equal(last["model"], module.state_dict(), "model")
    weights = tk.load_weights(Scripted({}), f"{url}/step_000000012.ckpt", storage_options=options)
    assert_tree_equal(weights.state_dict(), module.state_dict(), "weights")
    ema = tk.load_weights(Scripted({}), f"{url}/step_000000012.ckpt", ema=True, storage_options=options)
    assert_tree_equal(ema.state_dict(), trainer.ema_module.state_dict(), "ema weights")


@pytest.mark.timeout(120)
def test_resume_from_an_s3_url(s3):
    client, bucket, options = s3
    url = f"s3://{bucket}/run"

    def run(max_steps, ckpt_path=None, checkpoint_dir=None):
        module = TinyClassifier()
        trainer = tk.Trainer(
            run_mode="step", max_steps=max_steps, eval_interval=100, save_interval=3,
            **quiet(checkpoint_dir=checkpoint_dir, storage_options=options),
        )  # fmt: skip
        trainer.fit(module, make_loader(40, shuffle=True), make_loader(8), ckpt_path=ckpt_path)
        return module

    straight = run(6)
    run(3, checkpoint_dir=url)
    assert keys(client, bucket) == ["run/step_000000003.ckpt"]
    resumed = run(6, ckpt_path=f"{url}/step_000000003.ckpt")
    assert_tree_equal(resumed.state_dict(), straight.state_dict(), "model")
    last = run(6, ckpt_path="last", checkpoint_dir=url)  # finds the newest file in the bucket
    assert_tree_equal(last.state_dict(), straight.state_dict(), "model")
    assert keys(client, bucket) == ["run/step_000000003.ckpt", "run/step_000000006.ckpt"]


class FailsWhenPickledOnS3:
    """Raises from inside torch.save; first records, through boto3, what the bucket holds at that moment."""

    def __init__(self, client, bucket: str):
        self.client, self.bucket = client, bucket
        self.seen: dict[str, object] = {}

    def __reduce__(self):
        self.seen["keys"] = keys(self.client, self.bucket)
        best = torch.load(io.BytesIO(get(self.client, self.bucket, "run/best.ckpt")), weights_only=True)
        self.seen["best_step"] = best["trainer"]["global_step"]
        raise RuntimeError("boom while serialising")


@pytest.mark.timeout(120)
def test_failure_while_serialising_leaves_the_previous_best_on_s3(s3):
    client, bucket, options = s3
    payload = FailsWhenPickledOnS3(client, bucket)
    module = Saboteur({"loss": [1.0, 0.5, 0.2]}, payload, from_step=4)  # a new best at step 4 fails
    trainer = tk.Trainer(
        run_mode="step",
        max_steps=6,
        eval_interval=2,
        **quiet(checkpoint_dir=f"s3://{bucket}/run", storage_options=options),
    )
    with pytest.raises(RuntimeError, match="boom while serialising"):
        trainer.fit(module, make_loader(32), make_loader(8))
    assert payload.seen == {"keys": ["run/best.ckpt"], "best_step": 2}
    assert keys(client, bucket) == ["run/best.ckpt"]  # no new key, no temporary key
    best = torch.load(io.BytesIO(get(client, bucket, "run/best.ckpt")), weights_only=True)
    assert best["trainer"]["global_step"] == 2 and "bad" not in best["task"]


@pytest.mark.timeout(120)
def test_a_crafted_object_on_s3_is_refused(s3, tmp_path):
    client, bucket, options = s3
    buffer = io.BytesIO()
    torch.save({"trainkit_format": 1, "model": Sentinel(str(tmp_path / "sentinel"))}, buffer)
    client.put_object(Bucket=bucket, Key="run/evil.ckpt", Body=buffer.getvalue())
    with pytest.raises(tk.CheckpointError, match=f"s3://{bucket}/run/evil.ckpt"):
        tk.load_checkpoint(f"s3://{bucket}/run/evil.ckpt", storage_options=options)
    assert not (tmp_path / "sentinel").exists()
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        tk.load_checkpoint(f"s3://{bucket}/run/missing.ckpt", storage_options=options)


class Sentinel:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_missing_s3fs_names_the_extra(monkeypatch):
    """Simulates an environment without s3fs: importing it fails, and fsspec has not cached its class."""
    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is a mapping)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    with pytest.raises(ImportError, match=r"trainkit\[s3\]"):
        tk.load_checkpoint("s3://bucket/run/best.ckpt")
    with pytest.raises(ImportError, match=r"trainkit\[s3\]"):
        tk.Trainer(max_steps=1, checkpoint_dir="s3://bucket/run", log_dir=None)

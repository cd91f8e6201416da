"""Faulty checkpoint files and storage (issue 14, items 5-7): garbage, damaged and hostile files are each
refused with a CheckpointError that names the file and the kind of fault, without running anything from
them; ckpt_path="last" skips damaged candidates (with a warning) reading only a few KiB of each; storage
that cannot be written is found out before any training step."""

from __future__ import annotations

import os
import pickle
import random
import sys
import warnings
import zipfile

import pytest
import torch
from helpers import TinyClassifier, make_loader, quiet
from test_early_stopping import Scripted
from test_s3 import endpoint, s3  # noqa: F401  (fixtures: a real moto_server and a fresh bucket)

import trainkit as tk
from trainkit.checkpoint import BEST_NAME, CheckpointStorage, find_last, probe_step, regular_name

FORBIDDEN = f"{os.system.__module__}.system"  # how pickle names os.system: posix.system on Linux




def trainkit_dict(step: int, numel: int = 64) -> dict:
    """A minimal checkpoint with every required entry and a tensor of ``numel`` floats."""
    g = torch.Generator().manual_seed(step)
    return {
        "trainkit_format": 1,
        "model": {"w": torch.randn(numel, generator=g), "b": torch.zeros(3)},
        "optimizers": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
        "schedulers": [],
        "trainer": {"global_step": step, "epoch": 0},
    }


def load_error(path: str) -> str:
    """The message of the CheckpointError that loading ``path`` raises (any other outcome fails)."""
    with pytest.raises(tk.CheckpointError) as info:
        tk.load_checkpoint(path)
    message = str(info.value)
    assert os.fspath(path) in message and "weights_only=False" not in message
    return message


# -- item 6: classify what the file holds -----------------------------------------------------------------


def test_random_bytes_always_give_a_checkpoint_error_naming_the_file():
    rng = random.Random(1234)
    reasons = set()
    for i in range(400):
        data = rng.randbytes(rng.randrange(0, 300))
        # Also random tails after a pickle protocol byte and after a zip header, the two kinds checked.
        data = [data, b"\x80" + data, b"\x80\x02" + data, b"PK\x03\x04" + data][i % 4]
        with open("noise.ckpt", "wb") as f:
            f.write(data)
        message = load_error("noise.ckpt")
        assert "not a torch file" in message or "truncated or damaged" in message, message
        reasons.add(message.split("(")[0])
    assert len(reasons) >= 2  # both kinds were reached


def test_truncations_and_bit_flips_of_a_real_checkpoint():
    tk.checkpoint.CheckpointStorage(".").write("real.ckpt", trainkit_dict(4))
    real = open("real.ckpt", "rb").read()
    rng = random.Random(99)
    for cut in sorted(rng.sample(range(len(real)), 150)):
        with open("cut.ckpt", "wb") as f:
            f.write(real[:cut])
        message = load_error("cut.ckpt")
        assert ("truncated or damaged" in message) if cut >= 4 else ("not a torch file" in message), message
    loaded = 0
    for _ in range(200):
        flipped = bytearray(real)
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        with open("flip.ckpt", "wb") as f:
            f.write(flipped)
        try:  # a flip in tensor bytes or zip padding is not detectable: the file loads
            assert isinstance(tk.load_checkpoint("flip.ckpt"), dict)
            loaded += 1
        except tk.CheckpointError as exc:
            assert "flip.ckpt" in str(exc) and "weights_only=False" not in str(exc)
    assert 0 < loaded < 200


class RunsSystem:
    """Unpickling this calls os.system(...), which creates the sentinel file."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("how", ["torch", "pickle-2", "pickle-4", "pickle-0", "torch-legacy"])
def test_an_os_system_file_is_refused_by_name_and_runs_nothing(how, tmp_path):
    sentinel = tmp_path / "sentinel"
    payload = {**trainkit_dict(2), "model": RunsSystem(str(sentinel))}
    if how.startswith("torch"):
        torch.save(payload, "evil.ckpt", _use_new_zipfile_serialization=how == "torch")
    else:
        with open("evil.ckpt", "wb") as f:
            pickle.dump(payload, f, protocol=int(how[-1]))
    message = load_error("evil.ckpt")
    assert message.startswith("refused checkpoint 'evil.ckpt'") and FORBIDDEN in message, message
    assert "no code from it was run" in message
    with pytest.raises(tk.CheckpointError, match=f"refused.*{FORBIDDEN}"):
        tk.Trainer(max_steps=2, **quiet()).fit(TinyClassifier(), make_loader(16), ckpt_path="evil.ckpt")
    with pytest.raises(tk.CheckpointError, match=FORBIDDEN):
        probe_step(CheckpointStorage("."), "evil.ckpt")
    assert not sentinel.exists()
    # The payload is real: unpickling it the unsafe way does run os.system.
    if how != "torch-legacy":
        torch.load("evil.ckpt", weights_only=False) if how == "torch" else pickle.load(
            open("evil.ckpt", "rb")
        )
        assert sentinel.exists()


def write_zip(path: str, records: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            z.writestr(name, data)


def test_each_kind_of_fault_gets_its_own_reason():
    tk.checkpoint.CheckpointStorage(".").write("real.ckpt", trainkit_dict(4))
    real = open("real.ckpt", "rb").read()
    records = {n: zipfile.ZipFile("real.ckpt").read(n) for n in zipfile.ZipFile("real.ckpt").namelist()}
    cases = {
        "zeros.ckpt": (b"\0" * len(real), "is not a torch file (neither a zip archive nor a pickle)"),
        "text.ckpt": (b"hello, world\n" * 20, "is not a torch file (neither a zip archive nor a pickle)"),
        "plain.ckpt": (pickle.dumps({"model": 1}, protocol=2), "is not a torch file (a pickle without torch"),
        "cut.ckpt": (real[: len(real) // 2], "is truncated or damaged: its zip records are unreadable"),
    }
    for name, (data, reason) in cases.items():
        with open(name, "wb") as f:
            f.write(data)
        assert f"{name!r} {reason}" in load_error(name)
    write_zip("nopkl.ckpt", {"a/readme.txt": b"hi"})
    assert "'nopkl.ckpt' is not a torch file (a zip archive with no data.pkl)" in load_error("nopkl.ckpt")
    write_zip("norecord.ckpt", {n: d for n, d in records.items() if not n.endswith("/data/0")})
    assert "'norecord.ckpt' is truncated or damaged: tensor records ['0'] are missing" in load_error(
        "norecord.ckpt"
    )
    broken = dict(records)
    pkl = next(n for n in records if n.endswith("data.pkl"))
    broken[pkl] = records[pkl][: len(records[pkl]) // 2]
    write_zip("badpkl.ckpt", broken)
    assert "'badpkl.ckpt' is truncated or damaged (its data.pkl does not unpickle)" in load_error(
        "badpkl.ckpt"
    )
    torch.save({"trainkit_format": 1, "model": {}}, "partial.ckpt")
    assert "lacks the entries ['optimizers', 'schedulers', 'trainer']" in load_error("partial.ckpt")


def test_a_file_saved_without_crc32_loads_and_probes():
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(trainkit_dict(5), "nocrc.ckpt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert {i.CRC for i in zipfile.ZipFile("nocrc.ckpt").infolist()} == {0}
    assert tk.load_checkpoint("nocrc.ckpt")["trainer"]["global_step"] == 5
    assert probe_step(CheckpointStorage("."), "nocrc.ckpt") == 5


def test_a_legacy_torch_file_still_loads_and_probes():
    torch.save(trainkit_dict(7), "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert torch.equal(tk.load_checkpoint("legacy.ckpt")["model"]["w"], trainkit_dict(7)["model"]["w"])
    assert probe_step(CheckpointStorage("."), "legacy.ckpt") == 7


# -- item 7: resolving "last" -------------------------------------------------------------------------------


def zero(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"\0" * size)


def test_last_skips_a_zeroed_best_with_a_warning_naming_it(caplog):
    storage = CheckpointStorage("ckpts")
    storage.write(BEST_NAME, trainkit_dict(4))
    storage.write(regular_name(6), trainkit_dict(6))
    zero("ckpts/best.ckpt")
    with pytest.warns(
        RuntimeWarning,
        match=r"skips a damaged checkpoint: checkpoint '\S*ckpts/best.ckpt' is not a torch file",
    ):
        assert find_last(storage) == ("step_000000006.ckpt", 6)
    assert any("ckpts/best.ckpt" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_last_takes_the_older_file_when_the_newest_is_truncated():
    storage = CheckpointStorage("ckpts")
    for step in (3, 6):
        storage.write(regular_name(step), trainkit_dict(step))
    data = open("ckpts/step_000000006.ckpt", "rb").read()
    with open("ckpts/step_000000006.ckpt", "wb") as f:
        f.write(data[: len(data) - 30])  # only the end of the zip directory is gone
    with pytest.warns(RuntimeWarning, match="ckpts/step_000000006.ckpt' is truncated or damaged"):
        assert find_last(storage) == ("step_000000003.ckpt", 3)


def test_last_order_ties_and_nothing(memfs):
    storage = CheckpointStorage("memory://run")
    assert find_last(storage) is None
    storage.write(regular_name(6), trainkit_dict(6))
    storage.write(BEST_NAME, trainkit_dict(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing damaged: no warning
        assert find_last(storage) == ("step_000000006.ckpt", 6)  # a tie: the regular file wins
        storage.write(BEST_NAME, trainkit_dict(8))
        assert find_last(storage) == ("best.ckpt", 8)
    memfs.pipe("/run/best.ckpt", b"")  # an empty best: skipped, the regular file is taken
    with pytest.warns(RuntimeWarning, match="run/best.ckpt"):
        assert find_last(storage) == ("step_000000006.ckpt", 6)
    memfs.pipe("/run/step_000000006.ckpt", b"junk")
    with pytest.warns(RuntimeWarning) as caught:
        assert find_last(storage) is None
    assert ["best.ckpt" in str(w.message) for w in caught] == [True, False]
    assert "step_000000006.ckpt' is not a torch file" in str(caught[1].message)


def test_resolving_last_reads_a_few_kib_of_a_large_file(memfs, monkeypatch):
    storage = CheckpointStorage("memory://run")
    storage.write(regular_name(5), trainkit_dict(5, numel=4_000_000))  # 16 MB of tensor data
    size = memfs.size("/run/step_000000005.ckpt")
    reads: list[int] = []
    cat_file = storage.fs.cat_file

    def counting(path, start=None, end=None, **kwargs):
        data = cat_file(path, start=start, end=end, **kwargs)
        reads.append(len(data))
        return data

    monkeypatch.setattr(storage.fs, "cat_file", counting)
    assert find_last(storage) == ("step_000000005.ckpt", 5)
    print(f"find_last read {sum(reads)} bytes in {len(reads)} reads of a {size}-byte file")
    assert size > 16_000_000 and sum(reads) == 2 * 64 * 1024 and len(reads) == 2


# -- item 5: storage that cannot be written ---------------------------------------------------------------


def test_check_writable_accepts_a_writable_directory_and_leaves_nothing(memfs, tmp_path):
    for url in ("new/ckpts", f"file://{tmp_path}/other", "memory://run"):
        CheckpointStorage(url).check_writable()
    assert not os.path.exists("new") and not os.path.exists(tmp_path / "other")  # made, then removed again
    os.makedirs("old/ckpts")
    CheckpointStorage("old/ckpts").check_writable()
    assert os.listdir("old/ckpts") == []
    assert memfs.ls("/run", detail=False) == []


def test_check_writable_refuses_a_file_and_a_path_under_a_file():
    with open("taken", "w") as f:
        f.write("x")
    with pytest.raises(ValueError, match=r"checkpoint_dir='taken' is not writable: .*existing file"):
        CheckpointStorage("taken").check_writable()
    with pytest.raises(
        ValueError, match=r"checkpoint_dir='taken/ckpts' is not writable: (NotADirectory|FileExists)"
    ):
        CheckpointStorage("taken/ckpts").check_writable()
    assert open("taken").read() == "x"


@pytest.fixture(scope="module")
def locked_endpoint():
    """A moto S3 server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): unknown keys get 403."""
    from test_s3 import moto_server

    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as url:
        yield url


@pytest.mark.timeout(60)
def test_check_writable_refuses_a_bucket_that_cannot_be_created(locked_endpoint, monkeypatch):
    pytest.importorskip("s3fs")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    options = {
        "key": "wrong",
        "secret": "wrong",
        "client_kwargs": {"endpoint_url": locked_endpoint, "region_name": "us-east-1"},
    }
    storage = CheckpointStorage("s3://no-such-bucket/run", options)
    with pytest.raises(
        ValueError, match=r"checkpoint_dir='s3://no-such-bucket/run' is not writable: PermissionError"
    ):
        storage.check_writable()


# -- through Trainer.fit -------------------------------------------------------------------------------------


class StepsSeen(tk.Callback):
    """The global step at the start of every batch, and whether fit got as far as on_fit_start."""

    def __init__(self):
        self.steps: list[int] = []
        self.started = False

    def on_fit_start(self, trainer, module):
        self.started = True

    def on_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append(trainer.global_step)


def fit(checkpoint_dir, max_steps, *, script=(1.0, 0.5, 0.7, 0.9), save_interval=None, ckpt_path=None, **kw):
    seen = StepsSeen()
    trainer = tk.Trainer(
        run_mode="step",
        max_steps=max_steps,
        eval_interval=2,
        save_interval=save_interval,
        callbacks=[seen],
        **quiet(checkpoint_dir=checkpoint_dir, **kw),
    )
    result = trainer.fit(
        Scripted({"loss": list(script)}), make_loader(32), make_loader(8), ckpt_path=ckpt_path
    )
    return result, seen


def test_fit_last_resumes_past_a_zeroed_best_with_a_warning():
    fit("ckpts", 6, save_interval=6)  # best at step 4 (val_loss 0.5), a regular file at step 6
    assert sorted(os.listdir("ckpts")) == ["best.ckpt", "step_000000006.ckpt"]
    assert tk.load_checkpoint("ckpts/best.ckpt")["trainer"]["global_step"] == 4
    zero("ckpts/best.ckpt")
    with pytest.warns(RuntimeWarning, match=r"skips a damaged checkpoint: checkpoint '\S*ckpts/best.ckpt'"):
        result, seen = fit("ckpts", 8, ckpt_path="last")
    assert seen.steps == [6, 7] and result.global_step == 8


def test_fit_last_takes_the_older_file_when_the_newest_is_truncated():
    fit("ckpts", 6, save_interval=3, script=(1.0, 1.0, 1.0))  # regular files at 3 and 6; best at step 2
    data = open("ckpts/step_000000006.ckpt", "rb").read()
    with open("ckpts/step_000000006.ckpt", "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="step_000000006.ckpt' is truncated or damaged"):
        result, seen = fit("ckpts", 5, ckpt_path="last", script=(1.0, 1.0, 1.0))
    assert seen.steps == [3, 4] and result.global_step == 5


def test_fit_last_with_every_candidate_damaged_refuses_to_start_fresh():
    fit("ckpts", 6, save_interval=3, script=(1.0, 1.0, 1.0))
    for name in os.listdir("ckpts"):
        zero(f"ckpts/{name}")
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(tk.CheckpointError, match="found no complete checkpoint"),
    ):
        fit("ckpts", 8, ckpt_path="last")


@pytest.mark.parametrize("ckpt_path", [None, "last"])
@pytest.mark.parametrize("where", ["taken", "taken/ckpts"])
def test_fit_with_an_unwritable_checkpoint_dir_fails_before_any_step(where, ckpt_path, caplog):
    with open("taken", "w") as f:
        f.write("x")
    seen = StepsSeen()
    trainer = tk.Trainer(run_mode="step", max_steps=4, callbacks=[seen], **quiet(checkpoint_dir=where))
    with pytest.raises(ValueError, match=f"checkpoint_dir='{where}' is not writable"):
        trainer.fit(TinyClassifier(), make_loader(32), ckpt_path=ckpt_path)
    assert seen.steps == [] and not seen.started
    assert not any("starting fresh" in r.getMessage() for r in caplog.records)
    assert open("taken").read() == "x" and sorted(os.listdir(".")) == ["taken"]


@pytest.mark.timeout(60)
def test_fit_on_a_bucket_that_cannot_be_created_fails_before_any_step(locked_endpoint, monkeypatch):
    pytest.importorskip("s3fs")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    options = {
        "key": "wrong",
        "secret": "wrong",
        "client_kwargs": {"endpoint_url": locked_endpoint, "region_name": "us-east-1"},
    }
    seen = StepsSeen()
    trainer = tk.Trainer(
        run_mode="step",
        max_steps=4,
        callbacks=[seen],
        **quiet(checkpoint_dir="s3://no-such-bucket/run", storage_options=options),
    )
    with pytest.raises(
        ValueError, match="checkpoint_dir='s3://no-such-bucket/run' is not writable: PermissionError"
    ):
        trainer.fit(TinyClassifier(), make_loader(32))
    assert seen.steps == [] and not seen.started


def test_a_writable_checkpoint_dir_leaves_no_probe_behind(memfs):
    result, _ = fit("memory://run", 4, save_interval=None, script=(1.0, 2.0))
    assert memfs.ls("/run", detail=False) == ["/run/best.ckpt"]


@pytest.mark.timeout(200)
def test_two_ranks_both_raise_at_start_when_checkpoint_dir_is_a_file(tmp_path):
    from test_distributed import finish, free_port, start, worker_env

    worker = os.path.join(os.path.dirname(__file__), "storage_worker.py")
    (tmp_path / "taken").write_text("x")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", worker, str(tmp_path), str(tmp_path / "taken")]  # fmt: skip
    rc, output = finish(start(cmd, worker_env()), 150)
    assert rc == 0, output[-3000:]
    expected = f"ValueError: checkpoint_dir='{tmp_path / 'taken'}' is not writable: NotADirectoryError"
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    assert rank0[0].startswith(expected) and rank0[1] == "steps=[]"
    assert rank1[0].startswith(expected) and rank1[0].endswith("(found by rank 0)") and rank1[1] == "steps=[]"


@pytest.mark.timeout(120)
def test_find_last_on_s3_reads_two_ranges_and_skips_a_damaged_best(request, monkeypatch):
    pytest.importorskip("s3fs")
    client, bucket, options = request.getfixturevalue("s3")  # test_s3's fixtures: a real moto_server
    storage = CheckpointStorage(f"s3://{bucket}/run", options)
    storage.write(regular_name(3), trainkit_dict(3, numel=1_000_000))  # 4 MB of tensor data
    client.put_object(Bucket=bucket, Key="run/best.ckpt", Body=b"\0" * 1000)
    reads: list[tuple[int, int]] = []
    cat_file = storage.fs.cat_file

    def counting(path, start=None, end=None, **kwargs):
        data = cat_file(path, start=start, end=end, **kwargs)
        reads.append((start, len(data)))
        return data

    monkeypatch.setattr(storage.fs, "cat_file", counting)
    with pytest.warns(RuntimeWarning, match=f"s3://{bucket}/run/best.ckpt' is not a torch file"):
        assert find_last(storage) == ("step_000000003.ckpt", 3)
    size = client.head_object(Bucket=bucket, Key="run/step_000000003.ckpt")["ContentLength"]
    block = 64 * 1024
    assert reads == [(0, 1000), (0, block), (size - block, block)]  # all of the tiny best, two ranges

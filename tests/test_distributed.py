"""Distributed training with real gloo processes on CPU.

Process launches cost seconds of torch import each, so there are two: one ``torchrun`` run of
``ddp_worker.py main`` (six fits, shared by most tests through a module fixture) and one in which rank 1
raises. The worker saves what each rank saw; the tests compare it with single-process runs made here and
with hand-written PyTorch computations.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ddp_worker import COMMON, MAX_STEPS, PER_RANK_BATCH, TRAIN_N, loaders, stream_loader
from helpers import TinyClassifier, make_data, make_loader, quiet

import trainkit as tk

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
LAUNCH_TIMEOUT = 240  # seconds for one launch; a hang dumps the workers' stacks (below) and fails
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", DDP_WORKER_TIMEOUT=str(LAUNCH_TIMEOUT - 30), **extra)
    return env


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    # A session of its own, so that a hang can be ended with every process it started.
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args} did not finish within {timeout} s:\n{out[-6000:]}")
    return proc.returncode, out


def torchrun(*args: str, rendezvous: str = "master") -> tuple[int, str]:
    port = free_port()
    where = (
        ["--master_addr=127.0.0.1", f"--master_port={port}"]
        if rendezvous == "master"
        else ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", *where, WORKER]
    return finish(start([*cmd, *args], worker_env()), LAUNCH_TIMEOUT)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def shard(rank: int, start: int, count: int) -> torch.Tensor:
    """The rows DistributedSampler(shuffle=False) gives ``rank`` of 2: every other sample from ``rank``."""
    return make_data(TRAIN_N).tensors[0][rank::2][start : start + count]


# -- the main torchrun run, shared -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def main_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A single-process reference (batch 2B, writing its checkpoints), then ``ddp_worker.py main``."""
    out = tmp_path_factory.mktemp("ddp_main")
    module = TinyClassifier()
    trainer = tk.Trainer(**COMMON, **quiet(checkpoint_dir=str(out / "ref_ckpt")))
    train, val, test = loaders(2 * PER_RANK_BATCH)
    trainer.fit(module, train, val, test_loader=test)
    ref = SimpleNamespace(params=state(module), ema=state(trainer.ema_module), history=trainer.history)

    ckpt = out / "ref_ckpt" / "step_000000004.ckpt"
    rc, output = torchrun("main", str(out), str(ckpt), str(free_port()))
    assert rc == 0, output[-6000:]
    ranks = [torch.load(out / f"main_rank{r}.pt", weights_only=False) for r in (0, 1)]
    return SimpleNamespace(out=out, ref=ref, ranks=ranks)


@pytest.mark.timeout(300)
def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(main_run):
    a0, a1 = (r["A"] for r in main_run.ranks)
    for rank, a in enumerate((a0, a1)):
        assert (a["rank"], a["world_size"], a["global_step"], a["stop_reason"]) == (
            rank,
            2,
            MAX_STEPS,
            "max_steps",
        )
        # shuffle=False: rank r reads samples r, r+2, ...; the two shards make the single process's batch.
        assert torch.equal(a["first_batch"], shard(rank, 0, PER_RANK_BATCH))
        assert [h["step"] for h in a["history"]] == [4, 8, 12]
        assert_close(a["params"], main_run.ref.params)
        assert_close(a["ema"], main_run.ref.ema)
    # Rank 1's module was built from another seed: DDP's broadcast and the EMA must both start from rank 0's.
    assert not torch.equal(TinyClassifier(seed=0).net[0].weight, TinyClassifier(seed=1).net[0].weight)
    assert_equal(a0["params"], a1["params"])
    assert_equal(a0["ema"], a1["ema"])
    # The clipping took part: without it the same run ends elsewhere.
    unclipped = TinyClassifier()
    tk.Trainer(**{**COMMON, "clip_grad": None}, **quiet()).fit(unclipped, loaders(2 * PER_RANK_BATCH)[0])
    assert not torch.allclose(state(unclipped)["net.0.weight"], a0["params"]["net.0.weight"], atol=1e-3)


def _metrics_by_hand(params: dict[str, torch.Tensor], loader_n: int, seed: int) -> dict[str, float]:
    model = TinyClassifier()
    model.load_state_dict(params)
    x, y = make_data(loader_n, seed=seed).tensors
    with torch.no_grad():
        logits = model(x)
    return {"loss": F.cross_entropy(logits, y).item(), "acc": (logits.argmax(1) == y).double().mean().item()}


@pytest.mark.timeout(300)
def test_validation_metrics_cover_the_whole_set_and_agree_on_every_rank(main_run):
    a0, a1 = (r["A"] for r in main_run.ranks)
    assert a0["history"] == a1["history"]  # the very same numbers, every evaluation
    # ... and those of the single process (batch 2B, whole sets) at every evaluation
    for got, ref in zip(a0["history"], main_run.ref.history, strict=True):
        assert got["step"] == ref["step"]
        assert got["metrics"] == pytest.approx(ref["metrics"], rel=1e-5, abs=1e-6)
    last = a0["history"][-1]["metrics"]
    assert sorted(last) == sorted(
        f"{p}{s}_{m}" for p in ("", "ema_") for s in ("val", "test") for m in ("loss", "acc")
    )
    # 37 validation samples (19 + 18 per rank) and 1 test sample (rank 1's shard is empty).
    for prefix, params in (("", a0["params"]), ("ema_", a0["ema"])):
        for stage, n, seed in (("val", 37, 1), ("test", 1, 2)):
            expected = _metrics_by_hand(params, n, seed)
            for name, value in expected.items():
                assert last[f"{prefix}{stage}_{name}"] == pytest.approx(value, rel=1e-6, abs=1e-7)
        # and what a single process reports for the whole validation set with these weights
        model = TinyClassifier()
        model.load_state_dict(params)
        single = tk.Trainer(max_steps=1, **quiet()).validate(model, make_loader(37, batch_size=5, seed=1))
        assert {f"{prefix}{k}": v for k, v in single.items()} == pytest.approx(
            {k: v for k, v in last.items() if k.startswith(f"{prefix}val_")}, rel=1e-6
        )


@pytest.mark.timeout(300)
def test_only_rank_zero_writes_checkpoints_logs_and_progress(main_run):
    out = main_run.out
    # Each rank was given its own directories: rank 1's must not exist at all ("signal", "swapped": fits
    # B3 and E).
    names = ["ckpt_rank0", "main_rank0.pt", "main_rank1.pt", "ref_ckpt", "runs_rank0", "signal", "swapped"]
    assert sorted(os.listdir(out)) == names
    assert sorted(os.listdir(out / "ckpt_rank0")) == [
        "best.ckpt",
        "step_000000004.ckpt",
        "step_000000008.ckpt",
        "step_000000012.ckpt",
    ]
    assert main_run.ranks[0]["A"]["best_checkpoint"] == str(out / "ckpt_rank0" / "best.ckpt")
    files = sorted(os.listdir(out / "runs_rank0"))
    assert len(files) == 2 and files[0].startswith("events.out.tfevents.") and files[1] == "metrics.jsonl"
    lines = (out / "runs_rank0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [4, 8, 12]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs_rank0"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_loss")] == [4, 8, 12]
    assert [e.step for e in events.Scalars("train_loss")] == [2, 4, 6, 8, 10, 12]

    progress0, progress1 = (r["A"]["progress"] for r in main_run.ranks)
    assert "[trainkit] step 12/12" in progress0
    assert progress1 == ""


@pytest.mark.timeout(300)
def test_two_rank_checkpoint_resumes_in_one_process(main_run, tmp_path):
    a0 = main_run.ranks[0]["A"]
    path = main_run.out / "ckpt_rank0" / "step_000000004.ckpt"
    checkpoint = tk.load_checkpoint(path)
    assert checkpoint["model"].keys() == TinyClassifier().state_dict().keys()  # unwrapped: no "module."
    module = TinyClassifier(seed=7)
    trainer = tk.Trainer(**COMMON, **quiet())
    train, val, test = loaders(2 * PER_RANK_BATCH)
    result = trainer.fit(module, train, val, test_loader=test, ckpt_path=str(path))
    assert (result.global_step, result.epoch) == (MAX_STEPS, 1)
    assert [h["step"] for h in trainer.history] == [4, 8, 12]
    assert_close(state(module), a0["params"])
    assert_close(state(trainer.ema_module), a0["ema"])
    assert_close(state(module), main_run.ref.params)


@pytest.mark.timeout(300)
def test_one_process_checkpoint_resumes_on_two_ranks(main_run):
    d0, d1 = (r["D"] for r in main_run.ranks)
    for rank, d in enumerate((d0, d1)):
        assert (d["global_step"], d["epoch"], d["stop_reason"]) == (MAX_STEPS, 1, "max_steps")
        assert d["steps"] == list(range(5, MAX_STEPS + 1))
        assert [h["step"] for h in d["history"]] == [4, 8, 12]
        # The single process stopped after 4 batches of 8 (32 samples); each rank goes on at its 17th.
        assert torch.equal(d["first_batch"], shard(rank, 4 * PER_RANK_BATCH, PER_RANK_BATCH))
        assert_close(d["params"], main_run.ref.params)
        assert_close(d["ema"], main_run.ref.ema)
    assert_equal(d0["params"], d1["params"])
    assert_equal(d0["ema"], d1["ema"])


@pytest.mark.timeout(300)
def test_stop_requested_on_rank_one_only_ends_fit_on_both_ranks(main_run):
    # Rank 1 asked in on_batch_end after step 5; rank 0, with no such hook, still stops there.
    b0, b1 = (r["B"] for r in main_run.ranks)
    for b in (b0, b1):
        assert (b["global_step"], b["stop_reason"], b["stopped_early"]) == (5, "should_stop", False)
        assert b["should_stop"] is True  # rank 0 too: it learned of the request
    assert b0["steps"] == [0, 1, 2, 3, 4]  # on_batch_start
    assert b1["steps"] == [1, 2, 3, 4, 5]  # on_batch_end
    assert_equal(b0["params"], b1["params"])


@pytest.mark.timeout(300)
def test_stop_requested_in_training_step_travels_with_the_gradients(main_run):
    for r in main_run.ranks:
        b = r["B2"]
        assert (b["global_step"], b["stop_reason"]) == (5, "should_stop")
        assert b["steps"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # on_batch_start of two micro-steps a step
        # None per step: setup, loop start, the end of the first pass (step 4: epoch hooks ran), the stop.
        assert b["all_reduce_calls"] == 4
    assert_equal(main_run.ranks[0]["B2"]["params"], main_run.ranks[1]["B2"]["params"])


@pytest.mark.timeout(300)
def test_signal_on_one_rank_stops_both_and_rank_zero_saves_that_step(main_run):
    for r in main_run.ranks:
        b = r["B3"]
        assert (b["global_step"], b["stop_reason"], b["steps"]) == (3, "signal", [0, 1, 2])
    assert sorted(os.listdir(main_run.out / "signal")) == ["ckpt_rank0"]
    assert os.listdir(main_run.out / "signal" / "ckpt_rank0") == ["step_000000003.ckpt"]
    ckpt = tk.load_checkpoint(main_run.out / "signal" / "ckpt_rank0" / "step_000000003.ckpt")
    assert ckpt["trainer"]["global_step"] == 3
    assert_equal(ckpt["model"], main_run.ranks[0]["B3"]["params"])


@pytest.mark.timeout(300)
def test_signal_during_the_backward_of_a_hookless_step_is_heard_one_step_later(main_run):
    for r in main_run.ranks:
        b = r["B5"]
        assert (b["global_step"], b["stop_reason"], b["steps"]) == (4, "signal", [0, 1, 2, 3])


@pytest.mark.timeout(300)
def test_group_vote_in_the_loop_stops_both_ranks_after_the_asking_step(main_run):
    for r in main_run.ranks:
        b = r["B4"]
        assert (b["global_step"], b["stop_reason"], b["steps"]) == (3, "should_stop", [0, 1, 2])
        assert b["all_reduce_calls"] == 6  # setup, loop start, one started per step (3), the stop
    assert_equal(main_run.ranks[0]["B4"]["params"], main_run.ranks[1]["B4"]["params"])


@pytest.mark.timeout(300)
def test_group_vote_agrees_on_every_ranks_flags(main_run):
    for r in main_run.ranks:
        assert r["group_vote"] == [None, (True, False), (False, True), (False, False), (False, True), True]


@pytest.mark.timeout(300)
def test_partial_accumulation_at_the_end_of_an_unsized_pass_is_averaged_over_ranks(main_run):
    module = TinyClassifier()
    result = tk.Trainer(run_mode="epoch", max_epochs=1, accumulate_grad_batches=2, **quiet()).fit(
        module, stream_loader(0, 1, 2 * PER_RANK_BATCH)
    )
    assert result.global_step == 2
    g0, g1 = (r["G"] for r in main_run.ranks)
    # on_batch_end of the third batch comes before the pass ends and its partial step is taken
    assert (g0["global_step"], g0["epoch"], g0["steps"]) == (2, 1, [0, 1, 1])
    assert_equal(g0["params"], g1["params"])
    assert_close(g0["params"], state(module))


@pytest.mark.timeout(300)
def test_find_unused_parameters_with_a_stop_riding_beside_the_unused_branch(main_run):
    h0, h1 = (r["H"] for r in main_run.ranks)
    for h in (h0, h1):
        assert (h["global_step"], h["stop_reason"], h["steps"]) == (2, "should_stop", [0, 1])
        assert h["spare_unchanged"] is True
    assert_equal(h0["params"], h1["params"])


@pytest.mark.timeout(300)
def test_process_group_destroyed_only_when_trainkit_created_it(main_run):
    for r in main_run.ranks:
        keys = ("A", "B", "B2", "B3", "B4", "B5", "C", "D", "E", "F", "G", "H")
        alive = [r[k]["group_alive_after_fit"] for k in keys]
        assert alive == [False, True, True, True, True, True, False, False, False, False, False, False]


@pytest.mark.timeout(300)
def test_early_stopping_stops_both_ranks_at_the_same_step(main_run):
    # val_level = 1, 2, 2, 2 at steps 1..4; max mode, patience 2 -> the stop comes at step 4.
    for r in main_run.ranks:
        c = r["C"]
        assert (c["global_step"], c["stop_reason"], c["stopped_early"]) == (4, "early_stop", True)
        assert [(h["step"], h["metrics"]["val_level"]) for h in c["history"]] == [
            (1, 1.0),
            (2, 2.0),
            (3, 2.0),
            (4, 2.0),
        ]
        assert c["steps"] == [1, 2, 3, 4]


# -- failures ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_exception_on_one_rank_ends_the_whole_job_with_that_error(tmp_path):
    rc, output = torchrun("crash", str(tmp_path), rendezvous="c10d")  # as several machines would launch
    assert rc != 0
    assert "RuntimeError: boom on rank 1 at step 3" in output
    assert "ChildFailedError" in output  # torchrun reports the failed worker and stops the other
    assert list(tmp_path.iterdir()) == []  # neither rank came back from fit normally


# -- the distributed / rank parameters ---------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_rank_overrides_the_launchers_rank(main_run):
    for env_rank, r in enumerate(main_run.ranks):
        e = r["E"]
        assert (e["rank"], e["world_size"], e["global_step"]) == (1 - env_rank, 2, 3)
        assert torch.equal(e["first_batch"], shard(1 - env_rank, 0, PER_RANK_BATCH))
    assert_equal(main_run.ranks[0]["E"]["params"], main_run.ranks[1]["E"]["params"])
    # Only the process given rank=0 (torchrun's RANK=1) wrote its checkpoint.
    assert os.listdir(main_run.out / "swapped") == ["ckpt_RANK1"]
    assert os.listdir(main_run.out / "swapped" / "ckpt_RANK1") == ["step_000000003.ckpt"]


@pytest.mark.timeout(300)
def test_rank_world_size_and_init_method_without_launcher_environment(main_run):
    for env_rank, r in enumerate(main_run.ranks):
        f = r["F"]
        assert (f["rank"], f["world_size"], f["global_step"]) == (1 - env_rank, 2, 3)
        assert torch.equal(f["first_batch"], shard(1 - env_rank, 0, PER_RANK_BATCH))
        assert f["group_alive_after_fit"] is False
    assert_equal(main_run.ranks[0]["F"]["params"], main_run.ranks[1]["F"]["params"])


@pytest.mark.parametrize("kwargs", [{}, {"rank": 0}, {"rank": 0, "world_size": 2}])
def test_distributed_without_a_launcher_is_a_value_error_with_a_launch_hint(monkeypatch, kwargs):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError) as info:
        tk.Trainer(max_steps=1, distributed=True, **kwargs)
    message = str(info.value)
    assert "distributed=True" in message and "torchrun --nproc_per_node" in message
    assert "init_method" in message  # the way out for launchers that set no environment
    assert os.listdir(".") == []  # nothing written (the default checkpoint_dir/log_dir are relative)


@pytest.mark.timeout(120)
def test_one_rank_ddp_stops_after_the_current_step_without_any_vote(monkeypatch):
    class StopAt3(tk.Callback):
        def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                trainer.should_stop = True

    calls = []
    real = torch.distributed.all_reduce
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = tk.Trainer(
        run_mode="step", max_steps=20, distributed=True, rank=0, world_size=1,
        init_method=f"tcp://127.0.0.1:{free_port()}", callbacks=[StopAt3()], **quiet(),
    )  # fmt: skip
    result = trainer.fit(TinyClassifier(), make_loader())
    assert (result.global_step, result.stop_reason) == (3, "should_stop")
    assert calls == []  # a single rank has no one to ask


@pytest.mark.timeout(120)  # a wrong process-group init would wait for a rank 1 that never comes
def test_distributed_false_under_a_launcher_trains_alone_and_warns_once(monkeypatch):
    train_kwargs = dict(run_mode="step", max_steps=6, eval_interval=3, **quiet())
    alone = TinyClassifier()
    tk.Trainer(**train_kwargs).fit(alone, make_loader(), make_loader(16))

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    module = TinyClassifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tk.Trainer(distributed=False, **train_kwargs)
        result = trainer.fit(module, make_loader(), make_loader(16))
    launcher_warnings = [w for w in caught if "distributed=False" in str(w.message)]
    assert len(launcher_warnings) == 1, [str(w.message) for w in caught]
    assert "WORLD_SIZE=2" in str(launcher_warnings[0].message)
    assert not torch.distributed.is_initialized()
    assert (trainer.rank, trainer.world_size, result.global_step) == (0, 1, 6)
    assert_equal(state(module), state(alone))  # the whole data set, as a plain single-process run

"""Issue 14, items 1-4: faults of the loop found by trying other frameworks' bug reports on trainkit.

1. Resuming a run that ended for early stopping or a non-finite metric takes no step and writes nothing;
   after a stop request (``should_stop``, a signal) resuming continues.
2. A pass is exactly what ``for batch in train_loader`` yields; ``len()`` is only a hint (too small, too
   large, zero, absent): parity with a hand-written ``for`` loop, batch for batch and bit for bit, resume
   in the middle of a pass included.
3. GradScaler-skipped steps: counted as attempts (as Lightning does), and the skipped ones are visible
   (``train_skipped_steps`` and ``train_loss_scale`` at each log step) with the true count.
4. Bad returns from ``training_step`` / ``validation_step`` get trainkit's own error, naming the method, the
   key, the shape or type, and what is allowed.

Every expected value is computed independently: a scripted metric sequence, a hand-written loop.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, make_data, make_loader, quiet
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

import trainkit as tk


def cpu(**kwargs) -> dict:
    return quiet(device="cpu", **kwargs)


def assert_params_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = list(a.parameters()), list(b.parameters())
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in ``directory``: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


# == 1. resuming after each stop reason ==================================================================


class ScriptedVal(TinyClassifier):
    """val_loss read from a table by global step; records the global step of every training_step."""

    def __init__(self, values: dict[int, float]) -> None:
        super().__init__()
        self.values = values
        self.trained_at: list[int] = []

    def training_step(self, batch, batch_idx):
        self.trained_at.append(self.global_step)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        return {"loss": torch.tensor(self.values[self.global_step])}


class StopAt(tk.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


# The issue's sequence: the reference at step 2, the best at step 4, no improvement at 6 and 8 -> patience 2
# is used up at step 8; the 0.5 at step 10 must never be reached.
ISSUE_VALUES = {2: 1.0, 4: 0.9, 6: 0.95, 8: 0.97, 10: 0.5, 12: 0.4, 14: 0.3, 16: 0.2}
NAN_VALUES = {2: 1.0, 4: 0.9, 6: float("nan"), 8: 0.5, 10: 0.4, 12: 0.3}


def scripted_fit(directory: Path, values, *, save_interval=4, max_steps=16, ckpt_path=None, callbacks=()):
    task = ScriptedVal(values)
    trainer = tk.Trainer(
        run_mode="step", eval_interval=2, save_interval=save_interval, max_steps=max_steps,
        early_stop={"target": "val_loss", "patience": 2}, callbacks=list(callbacks),
        **cpu(checkpoint_dir=os.fspath(directory)),
    )  # fmt: skip
    result = trainer.fit(task, make_loader(64, 8), make_loader(8, 8), ckpt_path=ckpt_path)
    return task, trainer, result


@pytest.mark.parametrize(
    ("values", "save_interval", "reason", "stop_step", "files"),
    [
        (ISSUE_VALUES, 4, "early_stop", 8, {"step_000000004.ckpt", "step_000000008.ckpt", "best.ckpt"}),
        (
            NAN_VALUES,
            2,
            "non_finite",
            6,
            {"step_000000002.ckpt", "step_000000004.ckpt", "step_000000006.ckpt", "best.ckpt"},
        ),
    ],
    ids=["early_stop", "non_finite"],
)
def test_resuming_an_early_stopped_run_takes_no_step_and_writes_nothing(
    tmp_path, values, save_interval, reason, stop_step, files
):
    run = tmp_path / "run"
    task, _, first = scripted_fit(run, values, save_interval=save_interval)
    assert (first.global_step, first.stop_reason, first.stopped_early) == (stop_step, reason, True)
    assert first.best_step == 4 and len(task.trained_at) == stop_step
    assert set(os.listdir(run)) == files
    before = snapshot(run)

    for _ in range(2):  # today every resume trained two more steps
        task, trainer, again = scripted_fit(run, values, save_interval=save_interval, ckpt_path="last")
        assert task.trained_at == []
        assert (again.global_step, again.stop_reason, again.stopped_early) == (stop_step, reason, True)
        assert (again.best_step, again.best_metric) == (first.best_step, first.best_metric)
        assert again.best_checkpoint == os.fspath(run / "best.ckpt") == first.best_checkpoint
        assert [r["step"] for r in trainer.history] == [r["step"] for r in first.history]
        assert snapshot(run) == before  # same names, bytes and modification times


def test_resuming_from_a_checkpoint_before_the_early_stop_trains_to_it_again(tmp_path):
    """Only the state of the stop itself ends fit: an earlier checkpoint of the same run trains on."""
    run = tmp_path / "run"
    scripted_fit(run, ISSUE_VALUES)
    task, _, result = scripted_fit(tmp_path / "other", ISSUE_VALUES, ckpt_path=run / "step_000000004.ckpt")
    assert task.trained_at == [4, 5, 6, 7]
    assert (result.global_step, result.stop_reason) == (8, "early_stop")


def test_resuming_an_early_stopped_run_with_more_patience_or_none_trains_on(tmp_path):
    """The stop is decided again under the resumed run's settings (as a larger max_steps trains on)."""
    run = tmp_path / "run"
    scripted_fit(run, ISSUE_VALUES)

    task = ScriptedVal(ISSUE_VALUES)
    trainer = tk.Trainer(
        run_mode="step", eval_interval=2, save_interval=4, max_steps=12,
        early_stop={"target": "val_loss", "patience": 3}, **cpu(checkpoint_dir=os.fspath(run)),
    )  # fmt: skip
    result = trainer.fit(task, make_loader(64, 8), make_loader(8, 8), ckpt_path="last")
    assert task.trained_at == [8, 9, 10, 11]  # the 0.5 at step 10 is an improvement: no stop
    assert (result.global_step, result.stop_reason, result.best_step) == (12, "max_steps", 12)

    task = ScriptedVal(ISSUE_VALUES)
    trainer = tk.Trainer(run_mode="step", eval_interval=2, max_steps=10, **cpu(checkpoint_dir=os.fspath(run)))
    result = trainer.fit(task, make_loader(64, 8), make_loader(8, 8), ckpt_path=run / "step_000000008.ckpt")
    assert task.trained_at == [8, 9] and result.stop_reason == "max_steps"


def test_resuming_after_should_stop_continues_like_a_straight_run(tmp_path):
    run = tmp_path / "run"
    values = {s: 10.0 - s / 2 for s in range(2, 17, 2)}  # always improving: no early stop
    _, _, first = scripted_fit(run, values, save_interval=2, max_steps=10, callbacks=[StopAt(6)])
    assert (first.global_step, first.stop_reason) == (6, "should_stop")
    straight, _, expected = scripted_fit(tmp_path / "straight", values, save_interval=2, max_steps=10)
    task, trainer, resumed = scripted_fit(run, values, save_interval=2, max_steps=10, ckpt_path="last")
    assert task.trained_at == [6, 7, 8, 9]
    assert (resumed.global_step, resumed.stop_reason) == (10, "max_steps")
    assert trainer.should_stop is False
    assert_params_equal(task, straight)
    assert resumed.metrics == expected.metrics


# == 2. a pass is what `for batch in loader` yields ======================================================

N = 10  # samples; batch 4


class IndexedMap(Dataset):
    """(x, y, index); with ``noise`` each read adds noise drawn from the global RNG (an augmentation that
    runs in the main process with num_workers=0: the moment a batch is read must be the for loop's)."""

    def __init__(self, n: int = N, noise: bool = False) -> None:
        self.x, self.y = make_data(n).tensors
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i] + 0.1 * torch.randn(self.x.shape[1]) if self.noise else self.x[i]
        return x, self.y[i], i


class LyingSampler(Sampler[int]):
    """A shuffle of range(n) from its own generator; ``__len__`` says ``claimed``."""

    def __init__(self, n: int, claimed: int, seed: int = 3) -> None:
        self.n, self.claimed = n, claimed
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.claimed


class LyingBatchSampler(Sampler[list[int]]):
    """Batches of 4 consecutive indices (the last one short); ``__len__`` says ``claimed``."""

    def __init__(self, n: int, claimed: int) -> None:
        self.n, self.claimed = n, claimed

    def __iter__(self):
        for start in range(0, self.n, 4):
            yield list(range(start, min(self.n, start + 4)))

    def __len__(self) -> int:
        return self.claimed


class Stream(IterableDataset):
    """(x, y, index) for samples 0..n-1, split in contiguous halves between DataLoader workers (the usual
    get_worker_info() sharding): with 2 workers and batch 4, 10 samples come as batches of 4, 4, 1, 1."""

    def __init__(self, n: int = N) -> None:
        self.x, self.y = make_data(n).tensors
        self.n = n

    def __iter__(self):
        info = get_worker_info()
        lo, hi = 0, self.n
        if info is not None:
            per = math.ceil(self.n / info.num_workers)
            lo, hi = info.id * per, min(self.n, (info.id + 1) * per)
        for i in range(lo, hi):
            yield self.x[i], self.y[i], i


class SizedStream(Stream):
    def __init__(self, n: int = N, claimed: int = N) -> None:
        super().__init__(n)
        self.claimed = claimed

    def __len__(self) -> int:
        return self.claimed


def _loader(name: str) -> DataLoader:
    if name == "map_shuffle":
        return DataLoader(IndexedMap(), batch_size=4, shuffle=True)
    if name.startswith("map_sampler_"):
        claimed = {"short": 6, "long": 20, "zero": 0}[name.removeprefix("map_sampler_")]
        return DataLoader(IndexedMap(), batch_size=4, sampler=LyingSampler(N, claimed))
    if name == "map_noise_sampler_short":
        return DataLoader(IndexedMap(noise=True), batch_size=4, sampler=LyingSampler(N, 6))
    if name == "map_batch_sampler_short":
        return DataLoader(IndexedMap(), batch_sampler=LyingBatchSampler(N, 1))
    if name == "iter_w0":
        return DataLoader(SizedStream(), batch_size=4)
    if name == "iter_w2":
        return DataLoader(SizedStream(), batch_size=4, num_workers=2)
    if name == "iter_w2_long":
        return DataLoader(SizedStream(claimed=40), batch_size=4, num_workers=2)
    if name == "iter_nolen_w2":
        return DataLoader(Stream(), batch_size=4, num_workers=2)
    raise AssertionError(name)


# set-up: (len(loader) or None, sizes of the batches one pass yields)
SETUPS = {
    "map_shuffle": (3, [4, 4, 2]),  # an honest len
    "map_sampler_short": (2, [4, 4, 2]),  # a sampler whose len is too small
    "map_sampler_long": (5, [4, 4, 2]),  # ... too large
    "map_sampler_zero": (0, [4, 4, 2]),  # ... zero
    "map_noise_sampler_short": (2, [4, 4, 2]),  # too small, and every read draws from the global RNG
    "map_batch_sampler_short": (1, [4, 4, 2]),  # a batch sampler whose len is too small
    "iter_w0": (3, [4, 4, 2]),  # an iterable dataset with an honest len
    "iter_w2": (3, [4, 4, 1, 1]),  # the issue's case: split over 2 workers, len says 3, 4 batches come
    "iter_w2_long": (10, [4, 4, 1, 1]),  # len too large
    "iter_nolen_w2": (None, [4, 4, 1, 1]),  # no len at all
}


def test_the_set_ups_are_what_their_names_say():
    for name, (length, sizes) in SETUPS.items():
        loader = _loader(name)
        try:
            got = len(loader)
        except TypeError:
            got = None
        assert got == length, name
        assert [len(b[2]) for b in loader] == sizes, name
        assert sorted(sum((b[2].tolist() for b in loader), [])) == list(range(N)), name


class Recorder(TinyClassifier):
    """Records the sample indices of every training batch; dropout draws from the global RNG."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__(lr=0.1, dropout=dropout)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append(index.tolist())
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        return {"loss": F.cross_entropy(self(x), y)}


class HandRun:
    def __init__(self) -> None:
        self.steps = 0
        self.passes = 0
        self.pass_end_steps: list[int] = []


def for_loop(model: Recorder, loader, accumulate: int, max_steps=None, max_epochs=None) -> HandRun:
    """The definition: each pass is `for batch in loader`; every `accumulate` batches make a step, and a
    partial group at the end of a pass makes one too (its losses divided by `accumulate` as well)."""
    opt = model.configure_optimizers()
    model.train()
    opt.zero_grad(set_to_none=True)
    run = HandRun()
    while True:
        micro = 0
        for batch in loader:
            loss = model.training_step(batch, 0)
            (loss / accumulate if accumulate > 1 else loss).backward()
            micro += 1
            if micro == accumulate:
                opt.step()
                opt.zero_grad(set_to_none=True)
                micro = 0
                run.steps += 1
                if run.steps == max_steps:
                    return run
        if micro:
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.steps += 1
        run.passes += 1
        run.pass_end_steps.append(run.steps)
        if run.steps == max_steps or run.passes == max_epochs:
            return run


def val_loader() -> DataLoader:
    return DataLoader(IndexedMap(4), batch_size=4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("name", list(SETUPS))
def test_epoch_mode_trains_exactly_what_a_for_loop_yields(name, accumulate):
    task = Recorder()
    trainer = tk.Trainer(max_epochs=3, eval_interval=1, accumulate_grad_batches=accumulate, **cpu())
    torch.manual_seed(5)
    result = trainer.fit(task, _loader(name), val_loader())

    reference = Recorder()
    torch.manual_seed(5)
    hand = for_loop(reference, _loader(name), accumulate, max_epochs=3)

    assert len(task.seen) == 3 * len(SETUPS[name][1])
    assert task.seen == reference.seen  # the same batches, in the same order: none dropped, none added
    assert_params_equal(task, reference)
    assert (result.global_step, result.epoch) == (hand.steps, 3)
    # epoch mode evaluates at the real end of each pass
    assert [(r["step"], r["epoch"]) for r in trainer.history] == list(zip(hand.pass_end_steps, [1, 2, 3]))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("name", list(SETUPS))
def test_step_mode_trains_exactly_what_a_for_loop_yields(name, accumulate):
    max_steps = 7 if accumulate == 1 else 4  # inside the third pass
    task = Recorder()
    trainer = tk.Trainer(run_mode="step", max_steps=max_steps, accumulate_grad_batches=accumulate, **cpu())
    torch.manual_seed(5)
    result = trainer.fit(task, _loader(name))

    reference = Recorder()
    torch.manual_seed(5)
    hand = for_loop(reference, _loader(name), accumulate, max_steps=max_steps)

    assert task.seen == reference.seen
    assert_params_equal(task, reference)
    assert result.global_step == hand.steps == max_steps


@pytest.mark.parametrize("name", ["iter_w2", "map_sampler_short", "map_shuffle"])
def test_max_steps_on_the_last_batch_of_a_pass_completes_that_pass(name):
    """The pass is complete when its last batch is trained and len() (right or wrong) led trainkit to ask
    the iterator for one more: the epoch counts it, as at every other pass end."""
    per_pass = len(SETUPS[name][1])
    task = Recorder()
    result = tk.Trainer(run_mode="step", max_steps=per_pass, **cpu()).fit(task, _loader(name))
    assert (result.global_step, result.epoch) == (per_pass, 1)
    assert len(task.seen) == per_pass


def test_max_epochs_counts_the_steps_the_passes_really_have():
    task = Recorder()
    result = tk.Trainer(max_epochs=2, accumulate_grad_batches=3, **cpu()).fit(task, _loader("iter_w2"))
    assert (result.global_step, result.epoch) == (4, 2)  # 4 batches a pass: a group of 3, a group of 1


def test_progress_total_is_never_below_the_steps_taken(capsys):
    tk.Trainer(max_epochs=3, log_every_n_steps=1, **quiet(device="cpu", progress_bar=True)).fit(
        Recorder(), _loader("iter_w2")
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[trainkit] step ")]
    assert len(lines) == 12
    for line in lines:
        match = re.match(r"\[trainkit\] step (\d+)(?:/(\d+))? ", line)
        assert match is not None, line
        if match.group(2) is not None:
            assert int(match.group(1)) <= int(match.group(2)), line


def test_a_loader_that_yields_fewer_batches_than_len_takes_no_phantom_step():
    steps: list[int] = []

    class Steps(tk.Callback):
        def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
            steps.append(trainer.global_step)

    task = Recorder()
    result = tk.Trainer(max_epochs=2, callbacks=[Steps()], **cpu()).fit(task, _loader("map_sampler_long"))
    assert (result.global_step, result.epoch) == (6, 2)
    assert steps == [1, 2, 3, 4, 5, 6] and len(task.seen) == 6


# -- the pieces in trainkit.data --------------------------------------------------------------------------


@pytest.mark.parametrize("hint", [None, 0, 2, 3, 4, 9])
def test_pass_iterator_yields_what_the_iterator_yields_whatever_the_hint(hint):
    from trainkit.data import END_OF_PASS, PassIterator

    passes = PassIterator(iter("abc"), hint)
    got, fetched_early = [], []
    while (batch := passes.next_batch()) is not END_OF_PASS:
        got.append(batch)
        if passes.expects_end():
            ended = passes.ended()
            fetched_early.append((passes.taken, ended, passes.pending))
            if ended:
                break
    assert got == ["a", "b", "c"] and passes.taken == 3
    # ahead of time only from the batch the hint calls last on; the real end is found either way
    first = None if hint is None or hint > 3 else max(hint, 1)
    expected = [] if first is None else [(t, t == 3, t < 3) for t in range(first, 4)]
    assert fetched_early == expected


def test_exact_length_trusts_only_torchs_own_samplers():
    from trainkit.data import exact_length, len_hint

    assert exact_length(_loader("map_shuffle")) == len_hint(_loader("map_shuffle")) == 3
    for name in ("map_sampler_short", "map_batch_sampler_short", "iter_w0", "iter_nolen_w2"):
        assert exact_length(_loader(name)) is None, name
    assert len_hint(_loader("iter_nolen_w2")) is None and len_hint(_loader("map_sampler_zero")) == 0
    assert exact_length([1, 2]) == 2 and exact_length(iter([1, 2])) is None


@pytest.mark.parametrize("name", ["map_shuffle", "map_sampler_short", "map_batch_sampler_short", "iter_w2"])
@pytest.mark.parametrize("skip", [0, 2, 3, 4, 7])
def test_open_pass_skips_without_trusting_len(name, skip):
    from trainkit.data import open_pass

    torch.manual_seed(0)
    full = [b[2].tolist() for b in _loader(name)]
    torch.manual_seed(0)
    assert [b[2].tolist() for b in open_pass(_loader(name), skip)] == full[skip:]


# -- resume in the middle of a pass, in those set-ups ----------------------------------------------------


def _fit_steps(name, accumulate, max_steps, directory=None, save_interval=None, ckpt_path=None) -> Recorder:
    task = Recorder()
    trainer = tk.Trainer(
        run_mode="step", max_steps=max_steps, accumulate_grad_batches=accumulate, save_interval=save_interval,
        **cpu(checkpoint_dir=os.fspath(directory) if directory is not None else None),
    )  # fmt: skip
    torch.manual_seed(5)
    trainer.fit(task, _loader(name), ckpt_path=ckpt_path)
    return task


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("name", "accumulate", "stop", "total"),
    [
        ("iter_w2", 1, 3, 6),  # saved at the batch len() calls last; a 4th was already asked for
        ("iter_w2", 1, 7, 10),  # the same, in the second pass
        ("iter_w2", 3, 1, 4),
        ("map_noise_sampler_short", 1, 2, 5),  # the batch asked for early drew its noise before the save
        ("map_batch_sampler_short", 1, 2, 5),
        ("map_sampler_long", 1, 3, 5),  # saved after the last batch; the pass's end not yet seen
        ("iter_w2_long", 3, 2, 5),
        ("iter_nolen_w2", 1, 4, 7),
        ("map_shuffle", 1, 2, 5),
    ],
)
def test_resume_mid_pass_continues_exactly_where_the_for_loop_was(tmp_path, name, accumulate, stop, total):
    straight = _fit_steps(name, accumulate, total)
    reference = Recorder()
    torch.manual_seed(5)
    for_loop(reference, _loader(name), accumulate, max_steps=total)
    assert straight.seen == reference.seen
    assert_params_equal(straight, reference)

    first = _fit_steps(name, accumulate, stop, tmp_path, save_interval=stop)
    ckpt = tmp_path / f"step_{stop:09d}.ckpt"
    resumed = _fit_steps(name, accumulate, total, tmp_path / "second", ckpt_path=ckpt)
    assert first.seen + resumed.seen == straight.seen
    assert_params_equal(resumed, straight)


# -- under DDP: two gloo ranks, each with a loader whose len() is wrong --------------------------------------


class RankStream(IterableDataset):
    """Rank ``rank``'s half of 20 samples (every other one), split in contiguous halves between 2 workers:
    batches of 4, 4, 1, 1 a pass; ``__len__`` says ``claimed``."""

    def __init__(self, rank: int, claimed: int) -> None:
        x, y = make_data(20).tensors
        self.indices = list(range(rank, 20, 2))
        self.x, self.y, self.claimed = x, y, claimed

    def __len__(self) -> int:
        return self.claimed

    def __iter__(self):
        info = get_worker_info()
        half = self.indices[:5] if info is None or info.id == 0 else self.indices[5:]
        for i in half:
            yield self.x[i], self.y[i], i


# (claimed len of the dataset, accumulate_grad_batches). short_acc3: len() is 2, so the second micro-step
# of the first group syncs its gradients and asks the iterator early, yet no step follows it.
DDP_CASES = {"short_acc3": (8, 3), "short_acc1": (10, 1), "long_acc3": (40, 3)}


def _ddp_rank(rank: int, port: int, out: str) -> None:
    import warnings

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    results = {}
    for name, (claimed, accumulate) in DDP_CASES.items():
        task = Recorder(dropout=0.0)
        trainer = tk.Trainer(max_epochs=2, accumulate_grad_batches=accumulate, distributed=True, **cpu())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "cannot shard an iterable dataset": each rank reads its own
            # forkserver: workers forked from a clean server process, not from this one, whose gloo threads
            # could hold a lock at fork time (a plain fork hung here once); spawn costs seconds per worker
            loader = DataLoader(
                RankStream(rank, claimed), batch_size=4, num_workers=2, multiprocessing_context="forkserver"
            )
            result = trainer.fit(task, loader)
        params = [p.detach().clone() for p in task.parameters()]
        results[name] = {
            "params": params,
            "seen": task.seen,
            "step": result.global_step,
            "epoch": result.epoch,
        }
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(240)
def test_ddp_with_a_wrong_len_trains_what_each_ranks_for_loop_yields(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = torch.multiprocessing.spawn(_ddp_rank, args=(port, os.fspath(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180  # a hung rank fails the test instead of hanging the suite
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two DDP ranks did not finish within 180 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, (claimed, accumulate) in DDP_CASES.items():
        r0, r1 = ranks[0][name], ranks[1][name]
        # Each rank trained exactly what its own for loop yields, 4 batches a pass.
        for rank, r in enumerate(ranks):
            expected = [
                b[2].tolist() for b in DataLoader(RankStream(rank, claimed), batch_size=4, num_workers=2)
            ]
            assert r[name]["seen"] == expected * 2, name
        steps = 2 * (2 if accumulate == 3 else 4)
        assert (r0["step"], r0["epoch"], r1["step"], r1["epoch"]) == (steps, 2, steps, 2), name
        assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"])), name
        # One process on the union of both ranks' batches (equal sizes: the mean of the two means).
        reference = Recorder(dropout=0.0)
        union = [
            (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), torch.cat([a[2], b[2]]))
            for a, b in zip(
                *(DataLoader(RankStream(r, claimed), batch_size=4, num_workers=2) for r in (0, 1))
            )
        ]
        for_loop(reference, union, accumulate, max_epochs=2)
        for a, b in zip(r0["params"], reference.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


# == 3. steps skipped by the GradScaler ==================================================================


class Overflowing(TinyClassifier):
    """A loss 10x cross-entropy: in float16, gradients scaled by 65536, 32768 ... overflow, so the scaler
    skips some of the first steps and backs off."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) * 10.0

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": tk.WarmupScheduler(opt, 4)}


def hand_amp_loop(model: Overflowing, loader, steps: int, decay: float):
    """torch's documented GradScaler recipe, with the scheduler and EMA stepped at every attempt (as
    Lightning does); returns the cumulative skipped count and the scale after each step, and the EMA."""
    cfg = model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]
    scaler = torch.amp.GradScaler("cpu")
    ema = [p.detach().clone() for p in model.parameters()]
    skipped, scales, total = [], [], 0
    model.train()
    it = iter(loader)
    for _ in range(steps):
        batch = next(it)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model.training_step(batch, 0)
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        total += scaler.get_scale() < scale  # a skipped step halves the scale (no growth in 2000 steps)
        skipped.append(total)
        scales.append(scaler.get_scale())
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p, 1.0 - decay)
        opt.zero_grad(set_to_none=True)
    return skipped, scales, ema, opt.param_groups[0]["lr"]


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(os.fspath(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _amp_fit(log_dir, max_steps, checkpoint_dir=None, ckpt_path=None, save_interval=None):
    task = Overflowing()
    trainer = tk.Trainer(
        run_mode="step", max_steps=max_steps, precision="16-mixed", use_ema=True, ema_decay=0.9,
        log_every_n_steps=1, save_interval=save_interval,
        **quiet(device="cpu", log_dir=os.fspath(log_dir),
                checkpoint_dir=os.fspath(checkpoint_dir) if checkpoint_dir else None),
    )  # fmt: skip
    result = trainer.fit(task, make_loader(64, 8), ckpt_path=ckpt_path)
    return task, trainer, result


def test_skipped_steps_are_counted_as_attempts_and_logged_with_the_loss_scale(tmp_path):
    task, trainer, result = _amp_fit(tmp_path / "tb", 8)

    reference = Overflowing()
    skipped, scales, ema, lr = hand_amp_loop(reference, make_loader(64, 8), 8, decay=0.9)
    assert skipped[-1] == 3  # the scenario of the issue: 3 of 8 steps overflow
    # The documented choice: every attempt counts (global_step, scheduler, EMA), as in Lightning.
    assert result.global_step == 8 and trainer.schedulers[0].last_epoch == 8
    assert_params_equal(task, reference)
    assert all(torch.equal(a, b) for a, b in zip(trainer.ema_module.parameters(), ema))
    assert trainer.optimizer.param_groups[0]["lr"] == lr

    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train_skipped_steps"] == [(s, float(n)) for s, n in zip(range(1, 9), skipped)]
    assert scalars["train_loss_scale"] == [(s, v) for s, v in zip(range(1, 9), scales)]


def test_the_skipped_count_survives_a_resume(tmp_path):
    _amp_fit(tmp_path / "tb1", 4, checkpoint_dir=tmp_path / "ckpt", save_interval=4)
    _amp_fit(tmp_path / "tb2", 8, ckpt_path=tmp_path / "ckpt" / "step_000000004.ckpt")
    skipped, scales, _, _ = hand_amp_loop(Overflowing(), make_loader(64, 8), 8, decay=0.9)
    scalars = read_scalars(tmp_path / "tb2")
    assert scalars["train_skipped_steps"] == [(s, float(skipped[s - 1])) for s in range(5, 9)]
    assert scalars["train_loss_scale"] == [(s, scales[s - 1]) for s in range(5, 9)]


def test_full_precision_logs_no_loss_scale(tmp_path):
    tk.Trainer(
        run_mode="step", max_steps=2, log_every_n_steps=1, **quiet(device="cpu", log_dir=os.fspath(tmp_path))
    ).fit(TinyClassifier(), make_loader(16, 8))
    tags = set(read_scalars(tmp_path))
    assert "train_loss" in tags and not tags & {"train_skipped_steps", "train_loss_scale"}


# == 4. bad returns get trainkit's own errors ============================================================


class Returns(TinyClassifier):
    """training_step / validation_step return ``train(loss, x)`` / ``val(loss, x)``."""

    def __init__(self, train=None, val=None) -> None:
        super().__init__()
        self.train_fn, self.val_fn = train, val

    def training_step(self, batch, batch_idx):
        x, y = batch
        per_sample = F.cross_entropy(self(x), y, reduction="none")
        return self.train_fn(per_sample) if self.train_fn else per_sample.mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return self.val_fn(loss) if self.val_fn else {"loss": loss}


@pytest.mark.parametrize(
    ("train", "error", "words"),
    [
        (lambda ps: ps, ValueError, ["training_step", "loss", "(8,)", "scalar"]),
        (lambda ps: {"loss": ps, "n": 8}, ValueError, ["training_step", "'loss'", "(8,)", "scalar"]),
        (lambda ps: ps.reshape(2, 4).mean(1), ValueError, ["training_step", "(2,)", "scalar"]),
        (lambda ps: {"loss": "low"}, TypeError, ["training_step", "'loss'", "str", "tensor"]),
        (lambda ps: {"loss": [ps.mean()]}, TypeError, ["training_step", "'loss'", "list", "tensor"]),
        (lambda ps: ps.mean().detach(), ValueError, ["training_step", "loss", "requires_grad", "detach"]),
        (lambda ps: torch.tensor(3), ValueError, ["training_step", "loss", "int64", "float"]),
    ],
    ids=["per_sample", "per_sample_in_dict", "per_group", "str", "list", "detached", "integer"],
)
def test_a_bad_loss_from_training_step_names_method_key_and_shape(train, error, words):
    task = Returns(train=train)
    before = [p.detach().clone() for p in task.parameters()]
    trainer = tk.Trainer(max_steps=2, **cpu())
    with pytest.raises(error) as info:
        trainer.fit(task, make_loader(16, 8))
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "implicitly created" not in message and "does not have a grad_fn" not in message
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, task.parameters()))


@pytest.mark.parametrize(
    "train",
    [lambda ps: ps.mean().reshape(1), lambda ps: {"loss": ps.mean().reshape(1, 1), "per_sample": ps}],
    ids=["one_element", "extra_non_scalar_entry"],
)
def test_a_one_element_loss_and_extra_entries_are_accepted(train):
    result = tk.Trainer(max_steps=2, **cpu()).fit(Returns(train=train), make_loader(16, 8))
    assert result.global_step == 2


@pytest.mark.parametrize(
    ("val", "error", "words"),
    [
        (
            lambda loss: {"loss": loss, "acc": "high"},
            TypeError,
            ["'acc'", "str", "'high'", "tensor", "number"],
        ),
        (lambda loss: {"loss": loss, "acc": None}, TypeError, ["'acc'", "NoneType", "tensor", "number"]),
        (lambda loss: {"loss": loss, "acc": [0.5]}, TypeError, ["'acc'", "list", "tensor", "number"]),
        (lambda loss: {"loss": loss.repeat(3)}, ValueError, ["'loss'", "(3,)", "scalar"]),
        (lambda loss: {"loss": torch.complex(loss, loss)}, TypeError, ["'loss'", "complex", "real"]),
        (lambda loss: {3: loss}, TypeError, ["3", "int", "str"]),
    ],
    ids=["str", "none", "list", "vector", "complex", "int_key"],
)
@pytest.mark.parametrize("stage", ["val", "test", "fit"])
def test_a_bad_metric_from_validation_step_names_method_key_and_type(stage, val, error, words):
    task = Returns(val=val)
    trainer = tk.Trainer(run_mode="step", eval_interval=1, max_steps=2, **cpu())
    with pytest.raises(error) as info:
        if stage == "val":
            trainer.validate(task, make_loader(8, 4))
        elif stage == "test":
            trainer.test(task, make_loader(8, 4))
        else:
            trainer.fit(task, make_loader(16, 8), make_loader(8, 4))
    message = str(info.value)
    method = "test_step" if stage == "test" else "validation_step"
    for word in [method, *words]:
        assert word in message, f"{word!r} not in {message!r}"
    assert "float() argument" not in message and "could not convert" not in message


def test_numbers_bools_and_one_element_tensors_are_valid_metrics():
    class Fine(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            return {"a": 1, "b": 0.5, "c": True, "d": torch.tensor([2.0]), "e": torch.tensor(True)}

    metrics = tk.Trainer(max_steps=1, **cpu()).validate(Fine(), make_loader(8, 4))
    assert metrics == {"val_a": 1.0, "val_b": 0.5, "val_c": 1.0, "val_d": 2.0, "val_e": 1.0}


@pytest.mark.timeout(180)
def test_the_skipped_steps_benchmark_runs_in_smoke_mode(tmp_path):
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "skipped_steps.py"
    out = tmp_path / "skipped_steps.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["optimizer"] for r in rows] == ["AdamW for-each", "AdamW fused"]
    assert all(
        set(r["ratio_to_attempts"])
        == {"attempts", "attempts+count", "real steps (sync)", "real steps (hook)"}
        for r in rows
    )

"""A two-rank DDP run must exit cleanly after fit: no gloo thread may outlive the group trainkit destroyed.

The fault (issue 14, item 8): rank 1 alone asks to stop at step 3; both ranks return from fit, then one
aborts at interpreter exit with "terminate called without an active exception" (SIGABRT), about one run
in twelve on a busy machine. The cause: DDP's first construction imports ``torch._dynamo``, which imports
``torch.distributed.nn.functional``, whose functions take ``group=group.WORLD`` as a default evaluated at
import. Imported after the group exists, those defaults keep the gloo backend alive past
``destroy_process_group``; its worker threads run on, and one that drops a finished collective's tensor
while Python finalizes is ended inside a ``noexcept`` destructor. trainkit now imports that module before
creating the group, so destroying the group joins the threads before fit returns.

Each launch here checks the cause (gloo threads still alive after fit: every run without the fix) and the
symptom (an exit code other than 0: a flake). ``TRAINKIT_TEARDOWN_RUNS`` sets the number of launches
(2 by default; each takes seconds on a quiet machine).

    python tests/test_teardown_race.py OUT_DIR      (one rank, with RANK/WORLD_SIZE/MASTER_* set)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

RUNS = int(os.environ.get("TRAINKIT_TEARDOWN_RUNS", "2"))
LAUNCH_TIMEOUT = 120


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to a gloo backend (its work loop and its TCP loop)."""
    names = []
    for tid in sorted(os.listdir("/proc/self/task")):
        with open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
        if "gloo" in name:
            names.append(name)
    return names


def worker(out: Path) -> None:
    import torch
    from helpers import TinyClassifier, make_loader

    import trainkit as tk

    torch.set_num_threads(1)

    class StopOnRank1(tk.Callback):
        def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.rank == 1 and trainer.global_step == 3:
                trainer.should_stop = True

    rank = int(os.environ["RANK"])
    trainer = tk.Trainer(
        run_mode="step", max_steps=40, eval_interval=4, save_interval=4, distributed=True,
        callbacks=[StopOnRank1()], checkpoint_dir=str(out / "ckpt"), log_dir=None, progress_bar=False,
    )  # fmt: skip
    result = trainer.fit(TinyClassifier(), make_loader(64, batch_size=4), make_loader(16, batch_size=4))
    record = {"stop_reason": result.stop_reason, "global_step": trainer.global_step, "threads": gloo_threads()}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    # ... and the interpreter exits here, as a user's script does after fit.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path) -> list[tuple[int, str]]:
    """Both ranks as plain processes (what torchrun starts, without its agent): exit codes and output."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(out)], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )  # fmt: skip
        )
    done = []
    for proc in procs:
        try:
            output = proc.communicate(timeout=LAUNCH_TIMEOUT)[0]
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"a rank did not finish within {LAUNCH_TIMEOUT} s:\n{proc.communicate()[0][-4000:]}")
        done.append((proc.returncode, output))
    return done


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
@pytest.mark.timeout(LAUNCH_TIMEOUT * RUNS + 60)
def test_two_ranks_exit_cleanly_after_a_one_rank_stop(tmp_path):
    for run in range(RUNS):
        out = tmp_path / f"run{run}"
        out.mkdir()
        ranks = launch(out)
        for rank, (code, output) in enumerate(ranks):
            assert code == 0, f"launch {run}: rank {rank} exited with {code}:\n{output[-4000:]}"
        for rank in (0, 1):
            record = json.loads((out / f"rank{rank}.json").read_text())
            assert (record["stop_reason"], record["global_step"]) == ("should_stop", 3), record
            # The cause, in every run: a group trainkit destroyed leaves no gloo thread behind.
            assert record["threads"] == [], f"launch {run}, rank {rank}: {record['threads']} outlived fit"


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

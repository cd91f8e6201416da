"""DDP over NCCL on a CUDA device (skipped without CUDA): one rank under torchrun, so one GPU suffices.

It exercises what the gloo tests cannot: NCCL's process group, the CPU side group that carries the stop
flags, per-rank device placement and a checkpoint written from CUDA tensors that loads on the CPU.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import trainkit as tk

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    import trainkit as tk
    from helpers import TinyClassifier, make_loader

    class Stop(tk.Callback):
        def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 7:
                trainer.should_stop = True

    trainer = tk.Trainer(run_mode="step", max_steps=20, eval_interval=5, save_interval=5, distributed=True,
                         use_ema=True, clip_grad=1.0, precision="bf16-mixed", checkpoint_dir=sys.argv[1] + "/ckpt",
                         log_dir=None, progress_bar=False, callbacks=[Stop()])
    module = TinyClassifier()
    result = trainer.fit(module, make_loader(), make_loader())
    print("RESULT " + json.dumps({
        "step": result.global_step, "reason": result.stop_reason, "device": str(next(module.parameters()).device),
        "ema_device": str(next(trainer.ema_module.parameters()).device), "initialized": dist.is_initialized(),
        "val_loss": result.metrics["val_loss"],
    }))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cuda
@pytest.mark.timeout(180)
def test_nccl_run_on_one_gpu_stops_where_asked_and_saves_loadable_checkpoints(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           str(script), str(tmp_path), tests_dir]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["step"] == 7 and result["reason"] == "should_stop"
    assert result["device"].startswith("cuda") and result["ema_device"].startswith("cuda")
    assert result["initialized"] is False  # trainkit created the group, so it destroyed it
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["best.ckpt", "step_000000005.ckpt"]
    ckpt = tk.load_checkpoint(tmp_path / "ckpt" / "step_000000005.ckpt")
    assert all(t.device == torch.device("cpu") for t in ckpt["model"].values())
    assert ckpt["trainer"]["world_size"] == 1 and ckpt["trainer"]["global_step"] == 5

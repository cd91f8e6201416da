"""FSDP2 (``strategy="fsdp"``) with real gloo processes on CPU.

One ``torchrun`` launch of ``fsdp_worker.py parts`` (a module fixture) trains the same model, data and
seed under FSDP and under DDP; the tests compare what each rank saved.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainkit as tk
from trainkit.fsdp import resolve_units

WORKER = str(Path(__file__).with_name("fsdp_worker.py"))
LAUNCH_TIMEOUT = 240  # seconds for one launch; a hang dumps the workers' stacks and fails
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", FSDP_WORKER_TIMEOUT=str(LAUNCH_TIMEOUT - 30))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           WORKER, *args]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd} did not finish within {LAUNCH_TIMEOUT} s:\n{out[-6000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp_parts")
    launch("parts", str(out))
    return [torch.load(out / f"parts_rank{r}.pt") for r in (0, 1)]


def assert_same_run(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        torch.testing.assert_close(a["params"][name], b["params"][name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(a["ema"][name], b["ema"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert a["norms"] == pytest.approx(b["norms"], rel=1e-5)
    assert a["val"] == pytest.approx(b["val"], rel=1e-5)
    assert a["ema_val"] == pytest.approx(b["ema_val"], rel=1e-5)


def test_fsdp_matches_ddp_weights_ema_clip_norm_and_eval(parts: list[dict]) -> None:
    # Accumulation 2 over 5 micro-steps, clipping (the norm over all shards), AdamW, EMA, evaluation of
    # both models; the ranks initialised differently, so equality also shows rank 0's weights were used.
    for rank in (0, 1):
        assert_same_run(parts[rank]["ddp_announced"], parts[rank]["fsdp_announced"])
    assert len(parts[0]["fsdp_announced"]["norms"]) == 3
    assert all(n > 0.3 for n in parts[0]["fsdp_announced"]["norms"])  # clipping was active


def test_unannounced_pass_end_reduces_held_back_gradients(parts: list[dict]) -> None:
    # The last micro-step ran without reduction, then the pass ended: finish_accumulation reduces it, as
    # average_gradients does for DDP.
    assert_same_run(parts[0]["ddp_unannounced"], parts[0]["fsdp_unannounced"])
    assert_same_run(parts[0]["fsdp_announced"], parts[0]["fsdp_unannounced"])


def test_unknown_pass_length_reduces_every_micro_step(parts: list[dict]) -> None:
    assert_same_run(parts[0]["ddp_unannounced"], parts[0]["fsdp_no_length"])


def test_each_rank_holds_its_dim0_chunk_of_params_grads_optimizer_state_and_ema(parts: list[dict]) -> None:
    full = parts[0]["fsdp_announced"]["params"]
    for rank in (0, 1):
        run = parts[rank]["fsdp_announced"]
        for name, tensor in full.items():
            rows = tensor.shape[0]
            mine = min(math.ceil(rows / 2), rows - rank * math.ceil(rows / 2))  # torch.chunk's split
            expected = max(mine, 0) * tensor[0].numel()
            assert run["local_params"][name] == expected, name
            assert run["local_ema"][name] == expected, name
            assert run["local_opt"][name] == {"exp_avg": expected, "exp_avg_sq": expected}, name
        assert run["grad_numel"] == [sum(run["local_params"].values())] * 3
    # uneven first dimensions: 7 rows -> 4 + 3, 3 rows -> 2 + 1, 1 row -> 1 + 0
    assert [parts[r]["fsdp_announced"]["local_params"]["blocks.0.up.weight"] for r in (0, 1)] == [48, 36]
    assert [parts[r]["fsdp_announced"]["local_params"]["head.weight"] for r in (0, 1)] == [24, 12]
    assert [parts[r]["fsdp_announced"]["local_params"]["scale"] for r in (0, 1)] == [1, 0]
    total = sum(t.numel() for t in full.values())
    assert sum(sum(parts[r]["fsdp_announced"]["local_params"].values()) for r in (0, 1)) == total


def test_state_dicts_are_sharded_and_keyed_by_parameter_name(parts: list[dict]) -> None:
    run = parts[0]["fsdp_announced"]
    names = sorted(run["params"])
    assert run["model_keys"] == names
    assert run["opt_keys"] == names  # by name, not position: DCP can reshard into another world size
    assert run["all_dtensor"] is True
    assert run["fsdp_root"] == "FSDPModule"


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)


class _WithBlocks(tk.TaskModule):
    fsdp_units = (_Block,)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(_Block(), _Block())


def test_fsdp_units_default_and_errors() -> None:
    module = _WithBlocks()
    assert resolve_units(module) == (_Block,)  # the class attribute
    assert resolve_units(module, (torch.nn.Linear,)) == (torch.nn.Linear,)  # the argument wins
    assert resolve_units(torch.nn.Sequential(torch.nn.Linear(2, 2))) == ()  # the root alone
    with pytest.raises(ValueError, match=r"fsdp_units=\('Conv2d',\): Conv2d matches no submodule of _WithBlocks"):
        resolve_units(module, (torch.nn.Conv2d,))
    with pytest.raises(TypeError, match=r"fsdp_units=.*'Block' is not a torch.nn.Module subclass"):
        resolve_units(module, ("Block",))


def test_bf16_mixed_computes_in_bf16_and_keeps_fp32_shards_and_gradients(parts: list[dict]) -> None:
    run = parts[0]["fsdp_bf16"]
    assert run["compute_dtypes"] == ["torch.bfloat16"]
    assert run["param_dtypes"] == ["torch.float32"] and run["grad_dtypes"] == {"torch.float32"}
    assert parts[0]["fsdp_announced"]["compute_dtypes"] == ["torch.float32"]
    assert run["val"] == pytest.approx(parts[0]["fsdp_announced"]["val"], abs=0.02)  # close, not equal


def test_sharded_state_round_trips_through_dcp_exactly(parts: list[dict]) -> None:
    # model, optimizer, EMA (with its update count) and each rank's RNG under its own key, saved with
    # DCP and loaded in place into a fresh sharded model and optimizer: every local shard is equal.
    assert parts[0]["fsdp_announced"]["restored_equal"] is True
    assert parts[1]["fsdp_announced"]["restored_equal"] is True


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(strategy="zero"), ValueError, r"strategy='zero' is not valid; expected 'ddp' or 'fsdp'"),
        (dict(strategy="fsdp"), ValueError, r"strategy='fsdp' with distributed=False"),
        (dict(strategy="fsdp", distributed=True, precision="16-mixed"), ValueError,
         r"precision='16-mixed' with strategy='fsdp'"),
        (dict(fsdp_units="Block"), TypeError, r"fsdp_units='Block' is not valid"),
        (dict(fsdp_units=(1,)), TypeError, r"fsdp_units=\(1,\) is not valid: 1 is not a torch.nn.Module subclass"),
    ],
)  # fmt: skip
def test_bad_strategy_settings_are_refused(kwargs: dict, error: type, words: str) -> None:
    from trainkit.config import TrainerConfig

    with pytest.raises(error, match=words):
        TrainerConfig(max_steps=1, **kwargs)


def test_fsdp_units_is_normalised_to_a_tuple() -> None:
    from trainkit.config import TrainerConfig

    cfg = TrainerConfig(max_steps=1, strategy="fsdp", distributed=True, fsdp_units=_Block)
    assert cfg.fsdp_units == (_Block,) and cfg.hparams()["fsdp_units"] == "_Block"
    assert TrainerConfig(max_steps=1).strategy == "ddp"

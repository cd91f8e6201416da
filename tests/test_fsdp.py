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

try:  # a real moto_server for the S3 case (module-scoped fixture of test_s3)
    from test_s3 import KEY, REGION, SECRET, boto3, endpoint  # noqa: F401
except pytest.skip.Exception:  # s3fs or boto3 missing: the S3 case skips, the rest run

    @pytest.fixture(scope="module")
    def endpoint() -> str:
        pytest.skip("s3fs/boto3 are not installed")

WORKER = str(Path(__file__).with_name("fsdp_worker.py"))
LAUNCH_TIMEOUT = 240  # seconds for one launch; a hang dumps the workers' stacks and fails
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, nproc: int = 2, **extra_env: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", FSDP_WORKER_TIMEOUT=str(LAUNCH_TIMEOUT - 30), **extra_env)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", WORKER, *args]  # fmt: skip
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
    assert run["task_class"] == "Net" and run["units"] == ["FSDPModule"]


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


# -- Trainer(strategy="fsdp") ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp_trainer")
    launch("trainer", str(out))
    return out, [torch.load(out / f"trainer_rank{r}.pt") for r in (0, 1)]


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def test_trainer_fsdp_matches_ddp(fits: tuple[Path, list[dict]]) -> None:
    # 8 steps, accumulation 2 over passes of 5 batches (partial steps at pass ends), clipping, AdamW, EMA,
    # dropout, evaluation of both models every 2 steps on a validation set of 37 (uneven shards).
    _, runs = fits
    for rank in (0, 1):
        ddp, fsdp = runs[rank]["full_ddp"], runs[rank]["full_fsdp"]
        for name in ddp["params"]:
            torch.testing.assert_close(fsdp["params"][name], ddp["params"][name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fsdp["ema"][name], ddp["ema"][name], rtol=1e-5, atol=1e-6)
        assert [s for s, _ in fsdp["history"]] == [s for s, _ in ddp["history"]] == [2, 4, 6, 8]
        for (_, a), (_, b) in zip(fsdp["history"], ddp["history"]):
            assert a.keys() == b.keys() == {"val_loss", "ema_val_loss"}
            assert a == pytest.approx(b, rel=1e-6)
        assert fsdp["best_step"] == ddp["best_step"]
        assert fsdp["ema_is_sharded"] is True
    assert runs[0]["full_fsdp"]["history"] == runs[1]["full_fsdp"]["history"]  # metrics reduced over ranks


def test_trainer_writes_sharded_directories_and_exactly_one_best(fits: tuple[Path, list[dict]]) -> None:
    out, runs = fits
    best = runs[0]["full_fsdp"]["best_step"]
    assert listing(out / "full_fsdp") == [f"best_step_{best:09d}", "step_000000004", "step_000000008"]
    assert listing(out / "full_fsdp" / "step_000000004") == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert runs[1]["full_fsdp"]["best_checkpoint"] == str(out / "full_fsdp" / f"best_step_{best:09d}")
    # the early-stop run improved several times: one best_step_ directory is left, the newest
    assert [n for n in listing(out / "early") if n.startswith("best_")] == [
        f"best_step_{runs[0]['early']['best_step']:09d}"
    ]
    assert runs[0]["early"]["best_step"] > 2


def test_resume_mid_pass_from_last_is_bit_exact_with_each_ranks_rng(fits: tuple[Path, list[dict]]) -> None:
    # should_stop on rank 1 alone at step 6 stops both ranks there (mid-pass: 3 steps per pass); the fit
    # resumed with ckpt_path="last" from step_000000006 ends exactly where the uninterrupted one did:
    # weights, EMA, AdamW moments, every rank's RNG stream (dropout draws differ per rank), last metrics.
    out, runs = fits
    for rank in (0, 1):
        stopped, resumed, full = runs[rank]["stopped"], runs[rank]["resumed"], runs[rank]["full_fsdp"]
        assert (stopped["step"], stopped["stop_reason"]) == (6, "should_stop")
        assert resumed["step"] == 8
        for name in full["params"]:
            assert torch.equal(resumed["params"][name], full["params"][name]), name
            assert torch.equal(resumed["ema"][name], full["ema"][name]), name
        assert all(torch.equal(a, b) for a, b in zip(resumed["exp_avg"], full["exp_avg"]))
        assert torch.equal(resumed["rng"], full["rng"])
        assert resumed["history"][-1] == full["history"][-1]
    assert not torch.equal(runs[0]["full_fsdp"]["rng"], runs[1]["full_fsdp"]["rng"])  # the streams differ
    assert listing(out / "resumed") == ["best_step_000000004", "step_000000003", "step_000000006"]


def test_signal_on_one_rank_stops_every_rank_after_the_step_and_saves(fits: tuple[Path, list[dict]]) -> None:
    out, runs = fits
    assert [(runs[r]["signal"]["step"], runs[r]["signal"]["stop_reason"]) for r in (0, 1)] == [(3, "signal")] * 2
    assert "step_000000003" in listing(out / "signal")


def test_early_stop_under_fsdp(fits: tuple[Path, list[dict]]) -> None:
    _, runs = fits
    assert [runs[r]["early"]["stop_reason"] for r in (0, 1)] == ["early_stop"] * 2
    assert runs[0]["early"]["step"] == runs[1]["early"]["step"] < 20


def test_unit_class_matching_nothing_is_refused_before_any_file(fits: tuple[Path, list[dict]]) -> None:
    out, runs = fits
    assert runs[0]["bad_units"].startswith("fsdp_units=('Conv2d',): Conv2d matches no submodule of Net")
    assert not (out / "bad_units").exists()
    assert runs[1]["refit"].startswith("module=Net is already sharded (an earlier fit with strategy='fsdp'")


def test_sharded_checkpoint_reads_in_one_plain_process(fits: tuple[Path, list[dict]]) -> None:
    from fsdp_worker import Net

    out, runs = fits
    full = runs[0]["full_fsdp"]
    ckpt = tk.load_checkpoint(out / "full_fsdp" / "step_000000008")
    assert ckpt["trainer"]["global_step"] == 8
    for name, value in full["params"].items():
        assert torch.equal(ckpt["model"][name], value), name
    model = tk.load_weights(Net(), out / "full_fsdp" / "step_000000008", ema=True)
    for name, value in model.named_parameters():
        assert torch.equal(value.detach(), full["ema"][name]), name


def test_weights_optimizer_state_and_ema_load_into_another_world_size(fits: tuple[Path, list[dict]]) -> None:
    # step_000000004 was written by two ranks; one rank (a world of 1) resumes from it: DCP reshards.
    out, _ = fits
    launch("reshard", str(out), nproc=1)
    got = torch.load(out / "reshard_rank0.pt")
    saved = tk.load_checkpoint(out / "full_fsdp" / "step_000000004")
    assert got["world_size"] == 1 and got["step"] == 6
    for name, value in saved["model"].items():
        assert torch.equal(got["params"][name], value), name
        assert torch.equal(got["ema"][name], saved["ema"]["state_dict"][name]), name
    moments = saved["optimizers"][0]["state"]
    assert [torch.equal(a, moments[i]["exp_avg"]) for i, a in enumerate(got["exp_avg"])] == [True] * len(moments)


def test_sharded_checkpoints_on_s3_keep_one_best_and_resume_from_last(tmp_path: Path, endpoint: str) -> None:
    # A real S3 API (moto_server): every evaluation (steps 2 and 4, then 6 after the resume from "last")
    # saves a new best; each time the old best_step_ directory goes once the new one is complete.
    import uuid

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name=REGION)  # fmt: skip
    bucket = f"trainkit-fsdp-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    launch("s3", str(tmp_path), f"s3://{bucket}/run", FSDP_TEST_S3_ENDPOINT=endpoint, AWS_ACCESS_KEY_ID=KEY,
           AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION, NO_PROXY="127.0.0.1,localhost",
           no_proxy="127.0.0.1,localhost")  # fmt: skip
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))
    files = [".metadata", "__0_0.distcp", "__1_0.distcp"]
    dirs = ["best_step_000000006", "step_000000002", "step_000000004", "step_000000006"]
    assert keys == [f"run/{d}/{f}" for d in dirs for f in files]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"s3_rank{rank}.pt")
        assert got[4] == (4, 4, f"s3://{bucket}/run/best_step_000000004", 2)
        assert got[6] == (6, 6, f"s3://{bucket}/run/best_step_000000006", 3)  # resumed at 4: history kept


# -- examples/char_gpt.py --smoke -----------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "char_gpt.py"


def run_example(*args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(EXAMPLE), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_char_gpt_example_smoke_trains_sharded_then_resumes_from_last(tmp_path: Path) -> None:
    import re

    out = run_example("--smoke", "--strategy", "fsdp", "--checkpoint-dir", "ckpts", cwd=tmp_path)
    assert re.findall(r"^step +(\d+)  val_bpc \d+\.\d{3}  ema_val_bpc \d+\.\d{3}", out, re.M) == ["3", "6", "9", "12"]
    assert "strategy=fsdp x 2, max 12 steps" in out
    assert "stopped at step 12 (max_steps); best: " in out
    samples = re.findall(r"^--- sample \d \(EMA weights\)\n(.*?)\n(?=---|wall time)", out, re.M | re.S)
    assert [s.split(" ")[0] for s in samples] == ["def", "class", "import"]
    names = listing(tmp_path / "ckpts")
    assert names[1:] == ["step_000000006", "step_000000012"] and names[0].startswith("best_step_")
    # The same command again resumes from the newest complete checkpoint: nothing left to train, and the
    # samples come from the same best weights.
    again = run_example("--smoke", "--strategy", "fsdp", "--checkpoint-dir", "ckpts", cwd=tmp_path)
    assert "stopped at step 12 (max_steps)" in again and "val_bpc" not in again
    assert re.findall(r"^--- sample \d \(EMA weights\)\n(.*?)\n(?=---|wall time)", again, re.M | re.S) == samples

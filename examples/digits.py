"""Train a small CNN on scikit-learn's handwritten digits with trainkit.

The data set (1,797 grey 8x8 images of the digits 0-9) ships inside scikit-learn, so nothing is
downloaded. With the defaults this reaches about 98-99% test accuracy in well under half a minute on
two CPU cores. It validates on two sets, each evaluated on its own: the clean validation images and the
same images with noise added (metrics val_clean_* and val_noisy_*), and puts noisy images with the model's
predictions into TensorBoard through trainer.summary_writer.

    python examples/digits.py                       # train; checkpoints and logs under ./runs/digits
    python examples/digits.py --resume last         # continue from the newest checkpoint
    python examples/digits.py --smoke               # 40 steps, for CI
    torchrun --nproc_per_node=2 examples/digits.py --distributed
    tensorboard --logdir runs/digits

See examples/README.md for S3 checkpoints and the profiler.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk

BATCH_SIZE = 64  # the global batch: under DDP each of N ranks takes BATCH_SIZE // N
VAL_SIZE, TEST_SIZE = 180, 360  # of 1,797 images; the remaining 1,257 train
NOISE_STD = 0.3  # the "noisy" validation set: the same 180 images with Gaussian noise of this std added


def load_digits_splits(seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """The digits as (image, label) datasets: train, validation and test, split by a seeded shuffle."""
    from sklearn.datasets import load_digits  # imported here: only this function needs scikit-learn

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N x 1 x 8 x 8, in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, val, train = (
        order[:TEST_SIZE],
        order[TEST_SIZE : TEST_SIZE + VAL_SIZE],
        order[TEST_SIZE + VAL_SIZE :],
    )
    return tuple(TensorDataset(images[i], labels[i]) for i in (train, val, test))  # type: ignore[return-value]


def with_noise(dataset: TensorDataset, std: float, seed: int) -> TensorDataset:
    """The same images with seeded Gaussian noise added (clamped to [0, 1]), the same labels."""
    images, labels = dataset.tensors
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * std
    return TensorDataset((images + noise).clamp(0.0, 1.0), labels)


class DigitsCNN(tk.TaskModule):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers: 8x8 image in, 10 logits out."""

    def __init__(self, lr: float = 5e-3, max_steps: int = 400, warmup_steps: int = 40) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),  # 32 x 4 x 4
            torch.nn.Flatten(),
            torch.nn.Dropout(0.25),
            torch.nn.Linear(32 * 4 * 4, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 10),
        )
        self.lr, self.max_steps, self.warmup_steps = lr, max_steps, warmup_steps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        # Label smoothing keeps the net from growing over-confident on 1,257 training images.
        return F.cross_entropy(self(images), labels, label_smoothing=0.1)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        # The Trainer averages these over each validation set (weighted by batch size) and names them by set:
        # val_clean_loss, val_clean_acc, val_noisy_loss, ..., and with EMA on also ema_val_clean_loss, ...
        images, labels = batch
        logits = self(images)
        return {"loss": F.cross_entropy(logits, labels), "acc": (logits.argmax(1) == labels).float().mean()}

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)
        # Linear warmup from lr/10, then cosine decay to 0 at max_steps; one scheduler step per optimizer step.
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_steps - self.warmup_steps)
        sched = tk.WarmupScheduler(
            opt, warmup_steps=self.warmup_steps, warmup_factor=0.1, main_scheduler=cosine
        )
        return {"optimizer": opt, "lr_scheduler": sched}


class PrintMetrics(tk.Callback):
    """One line per evaluation, from rank 0 only: loss and accuracy on the clean set, accuracy on the noisy."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def on_eval_end(self, trainer: tk.Trainer, module: tk.TaskModule, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            print(
                f"step {trainer.global_step:4d}  epoch {trainer.current_epoch:2d}  "
                f"val_clean_loss {metrics['val_clean_loss']:.4f}  val_clean_acc {metrics['val_clean_acc']:.2%}  "
                f"val_noisy_acc {metrics['val_noisy_acc']:.2%}  "
                f"ema_val_clean_loss {metrics['ema_val_clean_loss']:.4f}  "
                f"ema_val_clean_acc {metrics['ema_val_clean_acc']:.2%}  "
                f"ema_val_noisy_acc {metrics['ema_val_noisy_acc']:.2%}  "
                f"({time.perf_counter() - self.start:.1f} s)",
                flush=True,
            )


class NoisyPredictions(tk.Callback):
    """At every evaluation, puts the first 16 noisy validation images into TensorBoard as one 4x4 picture,
    with the EMA model's predictions for them as text, through ``trainer.summary_writer`` (the writer of
    trainkit's own scalars: same run, same event file). Rank 0 only; other ranks have no writer."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images[:16]  # 16 x 1 x 8 x 8

    @torch.no_grad()
    def on_eval_end(self, trainer: tk.Trainer, module: tk.TaskModule, metrics: dict[str, float]) -> None:
        writer = trainer.summary_writer
        if writer is None:
            return
        model = trainer.ema_module or module
        was_training = model.training
        model.eval()
        predicted = model(self.images.to(next(model.parameters()).device)).argmax(1).tolist()
        model.train(was_training)
        grid = self.images.reshape(4, 4, 8, 8).permute(0, 2, 1, 3).reshape(32, 32)  # rows of 4 images
        step = trainer.global_step
        writer.add_image("noisy_val/images", grid, step, dataformats="HW")
        rows = [" ".join(str(p) for p in predicted[i : i + 4]) for i in range(0, 16, 4)]
        writer.add_text("noisy_val/predictions", "    " + "\n    ".join(rows), step)  # markdown code block


@torch.no_grad()
def count_correct(model: torch.nn.Module, loader: DataLoader) -> tuple[int, int]:
    """(correct, total) predictions of ``model`` over ``loader``."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(1) == labels).sum())
        total += len(labels)
    return correct, total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps (default 400; 40 with --smoke)"
    )
    p.add_argument("--checkpoint-dir", default="runs/digits/checkpoints", help="any fsspec path or URL")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint, e.g. http://127.0.0.1:5000")
    p.add_argument(
        "--resume", default=None, help="a checkpoint path/URL, or 'last' for the newest in --checkpoint-dir"
    )
    p.add_argument("--distributed", action="store_true", help="DDP; launch with torchrun")
    p.add_argument(
        "--profile", action="store_true", help="profile a few training steps into LOG_DIR/profiler"
    )
    p.add_argument("--log-dir", default="runs/digits", help="TensorBoard event files and metrics.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a 40-step run that exercises everything (for CI)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Train, then report the test accuracy of the best checkpoint's base and EMA weights.

    Returns ``{"fit": FitResult, "best_checkpoint": ..., "test_acc": ..., "ema_test_acc": ...}`` on rank 0
    (None on the other ranks).
    """
    args = parse_args(argv)
    started = time.perf_counter()
    # This model is tiny: a second intra-op thread saves little, and on a busy machine the threads' waiting
    # on each other made training ten times slower. (torchrun sets OMP_NUM_THREADS=1 for the same reason.)
    torch.set_num_threads(1)
    max_steps = args.max_steps or (40 if args.smoke else 400)
    eval_interval, save_interval = (10, 20) if args.smoke else (50, 200)
    # S3 and other object stores: credentials come from the usual environment variables or config files;
    # storage_options only adds the endpoint (MinIO, moto_server, Ceph, R2 ...).
    storage_options = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None

    torch.manual_seed(args.seed)  # the model's initial weights and dropout
    train_set, val_set, test_set = load_digits_splits(args.seed)
    # torchrun sets RANK and WORLD_SIZE; the Trainer reads them too when distributed=True.
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if args.distributed else 1
    is_main = not args.distributed or os.environ.get("RANK", "0") == "0"
    # Under DDP the Trainer gives the train loader a DistributedSampler (keeping shuffle=True) and shards
    # the evaluation loaders; each rank takes a slice of the same global batch.
    train_loader = DataLoader(
        train_set,
        batch_size=BATCH_SIZE // world_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    noisy_val_set = with_noise(val_set, NOISE_STD, seed=args.seed + 1)
    # Two validation sets, evaluated each on its own: metrics val_clean_* and val_noisy_* (and ema_val_...).
    val_loaders = {
        "clean": DataLoader(val_set, batch_size=256),
        "noisy": DataLoader(noisy_val_set, batch_size=256),
    }
    test_loader = DataLoader(test_set, batch_size=256)

    trainer = tk.Trainer(
        run_mode="step",
        max_steps=max_steps,
        eval_interval=eval_interval,
        save_interval=save_interval,
        # The EMA weights are the ones to ship, so their loss on the clean validation set drives early
        # stopping and, because no separate `monitor` is given, also picks best.ckpt.
        early_stop={"target": "ema_val_clean_loss", "patience": 5, "mode": "min"},
        clip_grad=1.0,
        use_ema=True,
        ema_decay=0.99,
        distributed=args.distributed,
        use_profiler=args.profile,
        callbacks=[PrintMetrics(), NoisyPredictions(noisy_val_set.tensors[0])],
        checkpoint_dir=args.checkpoint_dir,
        storage_options=storage_options,
        log_dir=args.log_dir,
        log_every_n_steps=10,  # train loss and lr to TensorBoard every 10 steps
        progress_bar=False,  # PrintMetrics reports every evaluation instead
    )
    model = DigitsCNN(max_steps=max_steps, warmup_steps=max(1, max_steps // 10))
    if is_main:
        print(
            f"digits: {len(train_set)} train / {len(val_set)} val (clean and noisy) / {len(test_set)} test images, "
            f"{math.ceil(len(train_set) / BATCH_SIZE)} steps per epoch, max {max_steps} steps; "
            f"checkpoints in {args.checkpoint_dir}, logs in {args.log_dir}",
            flush=True,
        )
    result = trainer.fit(model, train_loader, val_loaders, ckpt_path=args.resume)
    if not is_main:
        return None

    print(f"stopped at step {result.global_step} ({result.stop_reason})")
    if result.best_checkpoint is None:
        raise SystemExit("no best checkpoint was written; nothing to test")
    print(
        f"best checkpoint: {result.best_checkpoint} (step {result.best_step}, ema_val_clean_loss {result.best_metric:.4f})"
    )
    # Load the best weights back into fresh models, as an inference script would, and test them.
    report: dict[str, Any] = {"fit": result, "best_checkpoint": result.best_checkpoint}
    for name, ema in (("base", False), ("EMA", True)):
        fresh = tk.load_weights(DigitsCNN(), result.best_checkpoint, ema=ema, storage_options=storage_options)
        correct, total = count_correct(fresh, test_loader)
        print(f"test accuracy ({name} weights): {correct / total:.2%} ({correct}/{total})")
        report["ema_test_acc" if ema else "test_acc"] = correct / total
    print(f"wall time: {time.perf_counter() - started:.1f} s")
    return report


if __name__ == "__main__":
    main()

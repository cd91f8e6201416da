"""A small GPT-style character model trained with trainkit, sharded with FSDP2 (or replicated with DDP).

The text is Python's own standard library: the ``.py`` files next to the running interpreter's ``os``
module, so nothing is downloaded. Characters are UTF-8 bytes (a vocabulary of 256). Each transformer
block is one FSDP unit (``fsdp_units = (Block,)``): its weights are gathered just before it runs and
freed after.

    torchrun --nproc_per_node=2 examples/char_gpt.py --strategy fsdp   # ~1 minute on 2 CPU cores
    torchrun --nproc_per_node=2 examples/char_gpt.py --strategy ddp
    python examples/char_gpt.py                                          # one process, no sharding
    torchrun --nproc_per_node=2 examples/char_gpt.py --smoke             # a few steps, for CI

It resumes from the newest complete checkpoint in ``--checkpoint-dir`` (``ckpt_path="last"``), so running
the same command again continues (or, once ``--max-steps`` is reached, only samples). bf16 mixed precision
is used when a GPU is present. At the end rank 0 loads the best checkpoint's EMA weights into a plain,
unsharded model in its own process (``tk.load_weights`` reads a sharded checkpoint too) and prints a few
sampled lines.
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import trainkit as tk


def stdlib_text(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the standard library's ``.py`` sources, files in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


class Windows(Dataset):
    """``count`` windows of ``block + 1`` bytes at seeded random offsets: (input, next-byte target)."""

    def __init__(self, tokens: torch.Tensor, block: int, count: int, seed: int) -> None:
        self.tokens, self.block = tokens, block
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(tokens) - block - 1, (count,), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        chunk = self.tokens[s : s + self.block + 1]
        return chunk[:-1], chunk[1:]


class Block(torch.nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP (4x wide), each residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharGPT(tk.TaskModule):
    """Byte embedding + learned positions, ``layers`` blocks, a final norm and a 256-way head."""

    fsdp_units = (Block,)  # what strategy="fsdp" shards as units (Trainer(fsdp_units=...) overrides)

    def __init__(
        self, layers: int = 3, dim: int = 96, heads: int = 4, block: int = 64, lr: float = 1e-2,
        max_steps: int = 300, warmup_steps: int = 30,
    ) -> None:  # fmt: skip
        super().__init__()
        self.block = block
        self.embed = torch.nn.Embedding(256, dim)
        self.pos = torch.nn.Parameter(torch.zeros(block, dim))
        self.blocks = torch.nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, 256)
        self.lr, self.max_steps, self.warmup_steps = lr, max_steps, warmup_steps

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1).float(), y.flatten())

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1).float(), y.flatten())
        return {"loss": loss, "bpc": loss / math.log(2)}  # bits per character

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01, betas=(0.9, 0.99))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_steps - self.warmup_steps)
        sched = tk.WarmupScheduler(opt, warmup_steps=self.warmup_steps, warmup_factor=0.1, main_scheduler=cosine)
        return {"optimizer": opt, "lr_scheduler": sched}


@torch.no_grad()
def sample(model: CharGPT, prompt: bytes, length: int, seed: int, temperature: float = 0.8) -> str:
    """Continue ``prompt`` by ``length`` printable ASCII characters (and newlines), each sampled from the
    model (one plain process)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    unprintable = torch.ones(256, dtype=torch.bool)
    unprintable[32:127] = unprintable[10] = False
    tokens = torch.tensor(list(prompt), dtype=torch.long)[None]
    for _ in range(length):
        logits = model(tokens[:, -model.block :])[0, -1].float() / temperature
        logits[unprintable] = -float("inf")
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        tokens = torch.cat([tokens, nxt[None]], 1)
    return bytes(tokens[0].tolist()).decode("ascii")


class PrintMetrics(tk.Callback):
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def on_eval_end(self, trainer: tk.Trainer, module: tk.TaskModule, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            print(f"step {trainer.global_step:4d}  val_bpc {metrics['val_bpc']:.3f}  "
                  f"ema_val_bpc {metrics['ema_val_bpc']:.3f}  ({time.perf_counter() - self.start:.1f} s)",
                  flush=True)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="fsdp", help="under torchrun (default fsdp)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 300; 12 with --smoke)")
    p.add_argument("--checkpoint-dir", default=None, help="default runs/char_gpt/STRATEGY/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny model, a few steps (for CI)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Train (or resume), then sample from the best checkpoint's EMA weights on rank 0.

    Returns ``{"fit": FitResult, "samples": [...]}`` on rank 0, None on the other ranks.
    """
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)  # a small model: more intra-op threads per rank only contend on 2 cores
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = os.environ.get("RANK", "0") == "0"
    max_steps = args.max_steps or (12 if args.smoke else 300)
    size = dict(layers=2, dim=32, heads=2, block=32) if args.smoke else dict(layers=3, dim=96, heads=4, block=64)
    batch = 8 if args.smoke else 32  # the global batch; each rank takes batch // world
    checkpoint_dir = args.checkpoint_dir or f"runs/char_gpt/{args.strategy if distributed else 'single'}/checkpoints"

    text = stdlib_text(200_000 if args.smoke else 2_000_000)
    tokens = torch.tensor(list(text), dtype=torch.long)
    split = int(len(tokens) * 0.95)
    train_set = Windows(tokens[:split], size["block"], max_steps * batch, args.seed)
    val_set = Windows(tokens[split:], size["block"], 64 if args.smoke else 256, args.seed + 1)
    train_loader = DataLoader(train_set, batch_size=batch // world, shuffle=True,
                              generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    val_loader = DataLoader(val_set, batch_size=64)

    trainer = tk.Trainer(
        run_mode="step",
        max_steps=max_steps,
        eval_interval=max_steps // 4 if args.smoke else 50,
        save_interval=max_steps // 2 if args.smoke else 100,
        monitor={"target": "ema_val_loss", "mode": "min"},
        clip_grad=1.0,
        use_ema=True,
        ema_decay=0.9 if args.smoke else 0.98,
        distributed=distributed,
        strategy=args.strategy if distributed else "ddp",
        precision="bf16-mixed" if torch.cuda.is_available() else "32",
        checkpoint_dir=checkpoint_dir,
        log_dir=None,
        progress_bar=False,
        callbacks=[PrintMetrics()],
    )
    torch.manual_seed(args.seed)  # the initial weights (under FSDP and DDP every rank takes rank 0's)
    model = CharGPT(**size, max_steps=max_steps, warmup_steps=max(1, max_steps // 10))
    if is_main:
        params = sum(p.numel() for p in model.parameters())
        print(f"char_gpt: {len(text):,} bytes of stdlib source, {params / 1e6:.2f}M parameters, "
              f"{'strategy=' + args.strategy if distributed else 'one process'} x {world}, "
              f"max {max_steps} steps; checkpoints in {checkpoint_dir}", flush=True)  # fmt: skip
    result = trainer.fit(model, train_loader, val_loader, ckpt_path="last")
    if not is_main:
        return None
    print(f"stopped at step {result.global_step} ({result.stop_reason}); best: {result.best_checkpoint}")
    samples: list[str] = []
    if result.best_checkpoint is not None:
        # One plain process reads the (sharded or single-file) checkpoint into an unsharded model.
        fresh = tk.load_weights(CharGPT(**size), result.best_checkpoint, ema=True)
        for i, prompt in enumerate((b"def ", b"class ", b"import ")):
            samples.append(sample(fresh, prompt, 40 if args.smoke else 120, seed=args.seed + i))
            print(f"--- sample {i + 1} (EMA weights)\n{samples[-1]}")
    print(f"wall time: {time.perf_counter() - started:.1f} s")
    return {"fit": result, "samples": samples}


if __name__ == "__main__":
    main()

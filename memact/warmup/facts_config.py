"""Settings of the recall warm-up, kept free of torch so `memact --help` stays instant."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class PretrainConfig:
    """Settings of a warm-up run (defaults chosen by ``benchmarks/recall_warmup.py``, see docs/pretrain.md).

    Token counts are real (non-padding) tokens; ``lr`` is the peak learning rate.
    """

    tokens: int = 2_000_000  # not measured to convergence: 164k tokens were not enough (docs/pretrain.md)
    lr: float = 3e-3
    batch: int = 2  # rows of seq_len per step: batch * seq_len token slots (more, shorter rows early on)
    seq_len: int = 768
    curriculum: tuple[int, ...] = (2, 4, 8, 16)
    advance_at: float = 0.8  # held-out recall at the current level that moves on to the next level
    advance: str = "threshold"  # threshold (advance_at only) | schedule (equal token shares) | both (whichever first)
    review: float = 0.3
    prune_share: float = 0.3
    text_share: float = 0.05
    fillers: int = 1
    heldout_frac: float = 0.2
    freeze_heldout: bool = True
    warmup: float = 0.05  # share of tokens with a linear warm-up
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100  # steps (about 100k tokens at the default batch)
    eval_targets: int = 128  # held-out recall answers per level per evaluation (prune, seen names: a quarter)
    seed: int = 0
    threads: int = 1
    dtype: str = "auto"  # bf16 autocast or fp32; auto: bf16 only where the CPU has bf16 instructions

    def __post_init__(self) -> None:
        self.curriculum = tuple(int(n) for n in self.curriculum)
        if not self.curriculum or any(n < 1 for n in self.curriculum) or list(self.curriculum) != sorted(
                self.curriculum):
            raise ValueError(f"curriculum must be increasing fact counts >= 1, got {self.curriculum}")
        for name in ("tokens", "batch", "seq_len", "eval_every", "eval_targets", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 < self.advance_at <= 1.0:
            raise ValueError(f"advance_at must be above 0 and at most 1, got {self.advance_at}")
        if self.advance not in ("threshold", "schedule", "both"):
            raise ValueError(f"advance must be threshold, schedule or both, got {self.advance!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a share of the tokens, from 0 to below 1; got {self.warmup}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")

    @property
    def bf16(self) -> bool:
        """Whether to train and evaluate under bf16 autocast."""
        return self.dtype == "bf16" or (self.dtype == "auto" and cpu_has_bf16())


def cpu_has_bf16() -> bool:
    """True if the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX).

    Without them bf16 autocast is emulated: measured 10x slower than fp32 on an AVX2-only
    AMD EPYC (docs/pretrain.md), while FACTS.md found it 2x faster on an AVX-512-BF16 machine.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_curriculum(text: str) -> tuple[int, ...]:
    """``"2,4,8,16"`` -> (2, 4, 8, 16)."""
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"curriculum must be comma-separated fact counts like 2,4,8,16, got {text!r}") from None
    if not levels:
        raise ValueError(f"curriculum {text!r} names no level")
    return levels

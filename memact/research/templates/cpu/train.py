"""Train a small byte-level GPT for a fixed time budget and print its validation bits per byte.

This is the one file the research agent edits. The budget comes from the environment
(MEMACT_BUDGET_S, seconds of training; evaluation and start-up are not counted here, the
research runner kills the whole run at twice the budget). The summary block at the end is
what the runner parses; keep its format.

The defaults are deliberately not tuned (the learning rate in particular is on the low
side for this budget), so that a search has something real to find.
"""

import math
import os
import resource
import time

import prepare
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Constants the agent tunes ----
LEARNING_RATE = 1e-3  # AdamW peak learning rate; low on purpose (see the docstring)
WIDTH = 96  # model width (embedding size); must be a multiple of N_HEADS
DEPTH = 2  # number of transformer blocks
N_HEADS = 4  # attention heads per block
BATCH_SIZE = 16  # sequences per optimizer step
SEQ_LEN = 128  # training window in bytes (evaluation always uses prepare.EVAL_SEQ_LEN)
WARMUP_STEPS = 30  # linear learning-rate warmup, in optimizer steps
WARMDOWN_FRACTION = 0.3  # last fraction of the time budget over which the lr decays linearly to 10%
WEIGHT_DECAY = 0.1  # AdamW weight decay on matrices (not on norms or biases)
GRAD_CLIP = 1.0  # max global gradient norm; tiny models spike early without it
SEED = 1337  # model init and data order; fixed so that runs differ only by what the agent changed

# Seconds of training, set by the runner. Counted in CPU seconds of this process, not wall
# seconds: on a shared machine other programs stretch the wall clock, not the work done,
# so the same train.py trains for about the same number of steps run after run. On a very
# busy machine training also stops at WALL_CAP x the budget of wall time, so that the run
# ends short rather than being killed by the runner at 2x (start-up and evaluation count there).
BUDGET_S = float(os.environ.get("MEMACT_BUDGET_S", "60"))
WALL_CAP = 1.25  # x BUDGET_S of wall time; leaves 0.75x for start-up and evaluation before the kill at 2x
torch.set_num_threads(1)  # one core: steadier timings on a shared machine, so less run-to-run noise
torch.manual_seed(SEED)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then a 4x MLP, each with a residual."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level GPT: token + learned position embeddings, DEPTH blocks, tied output head."""

    def __init__(self, width: int, depth: int, n_heads: int, context: int):
        super().__init__()
        self.tok = nn.Embedding(prepare.VOCAB_SIZE, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, n_heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.T  # (B, T, VOCAB_SIZE) logits


class AdamW:
    """AdamW with decoupled weight decay on matrices only (not on norms, biases).

    Written out instead of torch.optim.AdamW: building a torch.optim optimizer imports
    torch's compiler stack, about 3 s of start-up, which a 20-60 s run cannot spare.
    """

    def __init__(self, params, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One update with learning rate ``lr``; clears the gradients."""
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t  # bias corrections of the moment estimates
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if g is None:
                continue
            m.lerp_(g, 1 - b1)
            v.lerp_(g * g, 1 - b2)
            if p.dim() >= 2:
                p.mul_(1 - lr * self.weight_decay)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)
            p.grad = None


def lr_at(step: int, progress: float) -> float:
    """Learning rate: warmup by steps, then flat, then a linear warmdown by budget fraction used.

    The warmdown follows the clock rather than the step count, so a run always ends at the
    low learning rate however many steps the machine managed.
    """
    warmup = min(1.0, (step + 1) / max(1, WARMUP_STEPS))
    left = 1.0 - progress
    decay = 1.0 if left >= WARMDOWN_FRACTION else 0.1 + 0.9 * left / WARMDOWN_FRACTION
    return LEARNING_RATE * warmup * decay


def main() -> None:
    if WIDTH % N_HEADS:
        raise ValueError(f"WIDTH={WIDTH} must be a multiple of N_HEADS={N_HEADS}")
    train_data, val_data = prepare.load_corpus()
    model = GPT(WIDTH, DEPTH, N_HEADS, context=max(SEQ_LEN, prepare.EVAL_SEQ_LEN))
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = AdamW(model.parameters(), WEIGHT_DECAY)
    batches = prepare.train_batches(train_data, BATCH_SIZE, SEQ_LEN, seed=SEED)

    step = 0
    start, wall_start = time.process_time(), time.perf_counter()
    while True:
        # Fraction of the budget used, by whichever clock runs out first.
        progress = max((time.process_time() - start) / BUDGET_S, (time.perf_counter() - wall_start) / (WALL_CAP * BUDGET_S))
        if progress >= 1.0:
            break
        x, y = next(batches)
        loss = F.cross_entropy(model(x).reshape(-1, prepare.VOCAB_SIZE), y.reshape(-1))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step(lr_at(step, progress))
        step += 1
    training_seconds = time.process_time() - start
    wall_seconds = time.perf_counter() - wall_start

    val_bpb = prepare.evaluate_bpb(model, val_data)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print("---")
    print(f"val_bpb: {val_bpb:.6f}")
    print(f"training_seconds: {training_seconds:.1f}")
    print(f"training_wall_seconds: {wall_seconds:.1f}")
    print(f"num_params: {num_params}")
    print(f"num_steps: {step}")
    print(f"peak_memory_mb: {peak_mb:.1f}")


if __name__ == "__main__":
    main()

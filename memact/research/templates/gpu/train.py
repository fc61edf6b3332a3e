"""Train a byte-level GPT on one GPU for a fixed time budget and print its validation bits per byte.

This is the one file the research agent edits. It is sized for one H100 (80 GB): bf16
autocast, flash attention through scaled_dot_product_attention, fused AdamW. The budget
comes from the environment (MEMACT_BUDGET_S, default 300 s of wall-clock training; the GPU
is the machine's own, so wall time measures the work done). Start-up and evaluation are
not counted here; the research runner kills the whole run at twice the budget. The summary
block at the end is what the runner parses; keep its format.

Without CUDA the script still runs on the CPU (slowly, in float32): that is for smoke
tests of the code path, not for results.
"""

import math
import os
import time

import prepare
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Constants the agent tunes ----
LEARNING_RATE = 6e-4  # AdamW peak learning rate (a common default for a GPT of this size)
WIDTH = 768  # model width (embedding size); must be a multiple of N_HEADS
DEPTH = 8  # number of transformer blocks
N_HEADS = 6  # attention heads per block (head size 128, good for flash attention)
BATCH_SIZE = 64  # sequences per optimizer step (64 x 1024 = 65k tokens)
SEQ_LEN = 1024  # training window in bytes (evaluation always uses prepare.EVAL_SEQ_LEN)
WARMUP_STEPS = 100  # linear learning-rate warmup, in optimizer steps
WARMDOWN_FRACTION = 0.3  # last fraction of the time budget over which the lr decays linearly to 10%
WEIGHT_DECAY = 0.1  # AdamW weight decay on matrices (not on norms or biases)
GRAD_CLIP = 1.0  # max global gradient norm
SEED = 1337  # model init and data order; fixed so that runs differ only by what the agent changed

BUDGET_S = float(os.environ.get("MEMACT_BUDGET_S", "300"))  # wall seconds of training, set by the runner
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(SEED)
torch.backends.cuda.matmul.allow_tf32 = True  # the few float32 matmuls left outside autocast
torch.backends.cudnn.allow_tf32 = True


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then a 4x MLP, each with a residual."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width, bias=False), nn.GELU(), nn.Linear(4 * width, width, bias=False)
        )

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
        for block in self.blocks:  # scale residual outputs down with depth (GPT-2)
            nn.init.normal_(block.proj.weight, std=0.02 / math.sqrt(2 * depth))
            nn.init.normal_(block.mlp[2].weight, std=0.02 / math.sqrt(2 * depth))

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


def lr_at(step: int, progress: float) -> float:
    """Learning rate: warmup by steps, then flat, then a linear warmdown by elapsed time.

    The warmdown follows the clock rather than the step count, so a run always ends at the
    low learning rate however many steps the GPU managed.
    """
    warmup = min(1.0, (step + 1) / max(1, WARMUP_STEPS))
    left = 1.0 - progress
    decay = 1.0 if left >= WARMDOWN_FRACTION else 0.1 + 0.9 * left / WARMDOWN_FRACTION
    return LEARNING_RATE * warmup * decay


def main() -> None:
    if WIDTH % N_HEADS:
        raise ValueError(f"WIDTH={WIDTH} must be a multiple of N_HEADS={N_HEADS}")
    train_data, val_data = prepare.load_corpus()
    model = GPT(WIDTH, DEPTH, N_HEADS, context=max(SEQ_LEN, prepare.EVAL_SEQ_LEN)).to(DEVICE)
    num_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
        betas=(0.9, 0.95),
        fused=DEVICE == "cuda",
    )
    batches = prepare.train_batches(train_data, BATCH_SIZE, SEQ_LEN, seed=SEED, device=DEVICE)
    use_bf16 = DEVICE == "cuda"

    step = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < BUDGET_S:
        lr = lr_at(step, elapsed / BUDGET_S)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(batches)
        with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, prepare.VOCAB_SIZE), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 100 == 0:  # .item() waits for the GPU: check for divergence only now and then
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} elapsed {elapsed:.0f}s", flush=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    training_seconds = time.perf_counter() - start

    val_bpb = prepare.evaluate_bpb(model, val_data, device=DEVICE)
    if DEVICE == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print("---")
    print(f"val_bpb: {val_bpb:.6f}")
    print(f"training_seconds: {training_seconds:.1f}")
    print(f"num_params: {num_params}")
    print(f"num_steps: {step}")
    print(f"peak_memory_mb: {peak_mb:.1f}")


if __name__ == "__main__":
    main()

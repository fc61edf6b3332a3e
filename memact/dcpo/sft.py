"""Supervised cold start: cross-entropy on the generated tokens of every segment of a trajectories file.

The same segments and masks as DCPO (docs/design.md, section 5): a segment's context is exactly
what the engine saw, and only the tokens the policy generated are trained, each once.

Output directory (``run.out_dir`` or ``--out``): the HF model + tokenizer (loads in
``memact rollout --policy DIR``), ``metrics.jsonl`` (loss per step) and ``config.yaml``.
Everything is written to a hidden sibling directory and renamed into place at the end, so
a run that stops early leaves no half-written output directory.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from memact.dcpo.checkpoint import save_hf
from memact.dcpo.config import Config, to_yaml
from memact.dcpo.data import TrainSequence, micro_batches, read_trajectories
from memact.dcpo.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_deepspeed,
    is_idle,
    lockstep,
    optimizer_step,
    start_process,
    step_normalizer,
)
from memact.dcpo.losses import aggregate
from memact.dcpo.metrics import MetricsLogger, StepBar
from memact.dcpo.modeling import load_for_training, model_vocab_size, token_logprobs
from memact.engines.factory import pad_token_id
from memact.util.seeds import derive_seed


def sft(cfg: Config) -> Path:
    """Train ``cfg.model.path`` on ``cfg.sft.data``; returns the output directory."""
    # all input errors before any output
    seqs = read_trajectories(cfg.sft.data, cfg.batch.max_seq_len, model_vocab_size(cfg.model.path))
    out = Path(cfg.run.out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {str(out)!r} exists and is not empty; choose another --out")
    dist = start_process(cfg)
    model, tokenizer = load_for_training(cfg)
    pad_id = pad_token_id(tokenizer)
    steps = [item for epoch in range(cfg.sft.epochs) for item in epoch_steps(seqs, cfg, epoch)]
    engine = init_deepspeed(model, cfg, total_steps=len(steps))
    staging = out.parent / f".{out.name}.partial"
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / "config.yaml").write_text(to_yaml(cfg))
        print(f"[memact] SFT: {len(seqs)} segments, {sum(s.n_trained for s in seqs)} trained tokens | "
              f"DeepSpeed ZeRO stage {engine.zero_optimization_stage()} | bf16 {engine.bfloat16_enabled()}",
              flush=True)
    log = MetricsLogger(staging, cfg, dist.is_main)
    log.table_every = 0  # one line per step is enough for SFT
    bar = StepBar(len(steps), cfg.logging.progress and dist.is_main, "sft")
    start = time.perf_counter()
    try:
        for step, (epoch, chunk) in enumerate(steps):
            t0, lr = time.perf_counter(), engine.get_lr()[0]
            mine = chunk[dist.rank::dist.world_size]  # data parallel: ranks split each step's segments
            loss, tokens, fed, grad_norm = sft_step(engine, [seqs[i] for i in mine], cfg, pad_id, dist)
            dt = time.perf_counter() - t0
            log.log({"step": step, "epoch": epoch, "loss": loss, "tokens": tokens, "lr": lr,
                     "grad_norm": grad_norm, "tok_s": fed / dt, "step_s": dt})
            bar.update(step + 1, f"epoch {epoch} loss {loss:.4f}")
            if cfg.sft.max_minutes and step + 1 < len(steps) and time_up(start, cfg.sft.max_minutes, dist):
                if dist.is_main:
                    print(f"[memact] SFT: sft.max_minutes={cfg.sft.max_minutes:g} reached; stopping after step "
                          f"{step + 1} of {len(steps)}", flush=True)
                break
        bar.stop()
        log.close()
        save_hf(engine, tokenizer, staging, dist.is_main)
        if dist.is_main:
            staging.replace(out) if not out.exists() else _replace_empty(out, staging)
        barrier()  # every rank returns once the output directory is in place
    except BaseException:
        bar.stop()
        log.close()
        if dist.is_main:
            print(f"[memact] SFT stopped; partial output left in {staging} (the output directory "
                  f"{out} was not written)", flush=True)
        raise
    return out


def _replace_empty(out: Path, staging: Path) -> None:
    out.rmdir()  # checked empty at the start
    staging.replace(out)


def time_up(start: float, minutes: float, dist: DistInfo) -> bool:
    """Whether any rank has trained ``minutes`` since ``start`` (all ranks agree, so all stop together)."""
    over = float(time.perf_counter() - start >= 60 * minutes)
    return all_reduce_sum([over], dist.world_size)[0] > 0


def epoch_steps(seqs: list[TrainSequence], cfg: Config, epoch: int) -> list[tuple[int, list[int]]]:
    """The epoch's optimizer steps: (epoch, segment indices), shuffled by (seed, epoch)."""
    order = list(range(len(seqs)))
    if cfg.sft.shuffle:
        random.Random(derive_seed(cfg.run.seed, "sft_shuffle", epoch)).shuffle(order)
    n = cfg.sft.segments_per_step
    return [(epoch, order[i:i + n]) for i in range(0, len(order), n)]


def sft_step(engine, seqs: list[TrainSequence], cfg: Config, pad_id: int, dist: DistInfo
             ) -> tuple[float, int, int, float]:
    """One optimizer step of token-mean cross-entropy over ``seqs``, accumulated over micro-batches.

    Returns:
        (loss in nats per trained token, trained tokens, real tokens fed to the model, gradient
        norm), all over every rank.
    """
    mbs = [mb.to(engine.device) for mb in
           micro_batches(seqs, cfg.batch.max_tokens_per_micro_batch, pad_id, cfg.batch.pad_to_multiple_of)]
    norm = step_normalizer(mbs, dist)
    total = 0.0
    for mb in lockstep(mbs, dist, engine):  # as many passes as the busiest rank
        logp, _ = token_logprobs(engine, mb, 1.0, with_entropy=False, fused=cfg.model.fused_logprobs)
        loss = logp.sum() * 0.0 if is_idle(mb) else aggregate(-logp, mb.loss_mask, "token_mean", norm)
        engine.backward(loss * dist.world_size, scale_wrt_gas=False)  # DeepSpeed averages over ranks
        total += loss.item()
    grad_norm = optimizer_step(engine)
    total, fed = all_reduce_sum([total, sum(mb.n_real_tokens for mb in mbs)], dist.world_size)
    return total, norm.token_count, int(fed), grad_norm

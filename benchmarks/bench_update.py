"""DCPO update throughput against a plain forward+backward of the same model on the same tokens.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_update.py --model runs/tiny --threads 1

Both sides see the same micro-batches (scripted trajectories cut into DCPO segments and
packed by the trainer's token budget):

- plain: ``model(input_ids).logits`` -> cross-entropy over every position -> backward
  (what a language-model step costs; no optimizer step);
- dcpo: ``memact.dcpo.trainer.update`` through DeepSpeed: log-probs of the trained tokens
  at temperature T, clipped surrogate + k3 KL, backward per micro-batch, one optimizer
  step (old/reference log-probs are computed beforehand and not timed, as in the trainer's
  ``update_tok_s``).

Rounds alternate plain/dcpo and the medians are printed with their ratio. Tokens are real
(unpadded) tokens. On a shared CPU the numbers are noisy: compare the ratio of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (`memact new-model --preset tiny --out DIR`)")
    ap.add_argument("--objectives", type=int, default=2)
    ap.add_argument("--trajectories", type=int, default=8, help="scripted trajectories to cut into segments")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=8192, help="micro-batch token budget")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from memact.agent.rollout import rollout
    from memact.dcpo.config import load_config
    from memact.dcpo.data import TrainSequence, micro_batches
    from memact.dcpo.distributed import DistInfo, init_deepspeed, start_process
    from memact.dcpo.modeling import load_for_training
    from memact.dcpo.trainer import fill_old_and_ref_logprobs, update
    from memact.trajectory import segment_trajectory

    cfg = load_config(None, [f"model.path={args.model}", f"run.threads={args.threads}", "optim.lr=1e-6",
                             f"batch.max_tokens_per_micro_batch={args.max_tokens}", "batch.max_seq_len=2048",
                             "rollout.context_budget=1040", "dcpo.kl_coef=0.001"])
    dist = start_process(cfg)
    trajs = rollout("scripted", args.objectives, args.trajectories, progress=False)
    seqs = [TrainSequence.from_segment(s, advantage=1.0 if i % 2 else -1.0, traj_id=i)
            for i, t in enumerate(trajs) for s in segment_trajectory(t.calls)]
    model, tok = load_for_training(cfg)
    engine = init_deepspeed(model, cfg)
    mbs = micro_batches(seqs, cfg.batch.max_tokens_per_micro_batch, tok.pad_token_id, cfg.batch.pad_to_multiple_of)
    from memact.dcpo.modeling import frozen_reference

    ref = frozen_reference(engine.module, cfg)
    fill_old_and_ref_logprobs(engine, ref, [mbs], cfg)
    tokens = sum(mb.n_real_tokens for mb in mbs)
    lm = engine.module

    def plain() -> float:
        t0 = time.perf_counter()
        for mb in mbs:
            logits = lm(input_ids=mb.input_ids, use_cache=False).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     mb.target_ids.reshape(-1))
            loss.backward()
        lm.zero_grad(set_to_none=True)
        return tokens / (time.perf_counter() - t0)

    def dcpo() -> float:
        t0 = time.perf_counter()
        update(engine, [mbs], cfg, DistInfo(0, 1, 0))
        return tokens / (time.perf_counter() - t0)

    plain(), dcpo()  # warm-up: kernel selection for these shapes
    p, d = [], []
    for _ in range(args.rounds):
        p.append(plain())
        d.append(dcpo())
    mp, md = statistics.median(p), statistics.median(d)
    print(f"{len(seqs)} segments, {tokens} tokens in {len(mbs)} micro-batches, {args.threads} thread(s), "
          f"{dist.world_size} process")
    print(f"plain forward+backward: {mp:,.0f} tok/s (rounds: {', '.join(f'{x:,.0f}' for x in p)})")
    print(f"DCPO update:            {md:,.0f} tok/s (rounds: {', '.join(f'{x:,.0f}' for x in d)})")
    print(f"ratio DCPO / plain:     {md / mp:.2f}")


if __name__ == "__main__":
    main()

"""DCPO update throughput by batch layout: naive segments against packing, fused log-probs, prefix reuse.

    HF_HUB_OFFLINE=1 .venv/bin/memact new-model --preset tiny --out /tmp/mb/tiny
    HF_HUB_OFFLINE=1 .venv/bin/memact rollout --policy scripted --objectives 4 --n 32 --out /tmp/mb/seg.jsonl
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dcpo_update.py --model /tmp/mb/tiny \\
        --data /tmp/mb/seg.jsonl --threads 1

Every segment of the rollout file is trained in one optimizer step (the trainer's
``accumulate``: log-probs of the trained tokens, clipped surrogate + k3 KL, backward per
micro-batch) followed by a torch AdamW step; old/reference log-probs are filled beforehand
and not timed, as in the trainer's ``update_tok_s``. Variants:

- naive: one right-padded row per segment (length-binned micro-batches), LM head + full-vocab
  log_softmax, no reuse;
- fused: naive rows, ``memact_kernels.linear_logprobs``;
- packed+fused: several segments per row (block-diagonal 4D mask, ``batch.layout=packed``);
- prefix+fused / prefix: one row per segment, the micro-batch's shared head run once and its
  KV cache reused (``batch.layout=prefix``);
- tree+fused: shared heads once in packed rows with a tree mask (both flags).

"useful tok/s" counts the tokens of the naive layout (every segment's prompt + response,
unpadded) per second, whatever the variant computes, so the variants are compared on the
same work. Rounds alternate the variants; medians and the ratio to naive are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

LAYOUTS = {  # variant -> (config overrides, fused log-probs)
    "naive": ("batch.layout=rows", False),
    "fused": ("batch.layout=rows", True),
    "packed+fused": ("batch.layout=packed", True),
    "prefix+fused": ("batch.layout=prefix", True),
    "prefix": ("batch.layout=prefix", False),
    "tree+fused": ("batch.layout=tree", True),
}


class Bench:
    """The model, the segments and a timed DCPO update for each layout (shared with bench_flops.py)."""

    def __init__(self, model_dir: str, data: str, threads: int, max_tokens: int = 8192, row_len: int = 1280):
        import torch

        from memact.dcpo.data import read_trajectories
        from memact.models.model import load_policy

        torch.set_num_threads(threads)
        self.seqs = read_trajectories(data, max_seq_len=4096)
        for s in self.seqs:
            s.advantage = 1.0 if s.traj_id % 2 else -1.0
        # fp32: bf16 autocast is ~10x slower on this CPU (no avx512_bf16)
        self.model, self.tok = load_policy(model_dir)
        self.model.config._attn_implementation = "sdpa"
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        self.max_tokens, self.row_len = max_tokens, row_len
        self.useful = sum(len(s) for s in self.seqs)  # tokens of the naive layout, unpadded
        self.trained = sum(s.n_trained for s in self.seqs)

    def variant(self, name: str) -> tuple:
        """(config, micro-batches with old/ref log-probs, computed tokens, padded tokens) of a layout."""
        import torch

        from memact.dcpo.config import load_config
        from memact.dcpo.modeling import token_logprobs
        from memact.dcpo.packing import build_micro_batches

        layout, fused = LAYOUTS[name]
        cfg = load_config(None, [*layout.split(), f"model.fused_logprobs={fused}", "dcpo.kl_coef=0.001",
                                 "batch.max_seq_len=4096", f"batch.max_tokens_per_micro_batch={self.max_tokens}",
                                 f"batch.packed_row_len={self.row_len}"])
        mbs = build_micro_batches(self.seqs, cfg.batch, self.tok.pad_token_id)
        with torch.no_grad():
            for mb in mbs:
                mb.old_logprobs = token_logprobs(self.model, mb, 1.0, with_entropy=False, fused=fused)[0]
                mb.ref_logprobs = mb.old_logprobs - 0.01 * mb.loss_mask
        computed = sum(mb.packed.n_slots if mb.packed is not None else
                       mb.n_real_tokens - (len(mb.index) - 1) * mb.shared_prefix for mb in mbs)
        padded = sum(mb.packed.input_ids.numel() if mb.packed is not None else mb.input_ids.numel() for mb in mbs)
        return cfg, mbs, computed, padded

    def seconds(self, variant: tuple) -> float:
        """Wall time of one optimizer step over all segments: accumulate (fwd+bwd) + AdamW."""
        from memact.dcpo.distributed import DistInfo
        from memact.dcpo.trainer import UpdateStats, accumulate

        model = self.model

        class Shim:  # what ``accumulate`` asks of a DeepSpeed engine
            module = model

            def __call__(self, *a, **kw):
                return model(*a, **kw)

            def backward(self, loss, scale_wrt_gas=True):
                loss.backward()

        cfg, mbs = variant[0], variant[1]
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        accumulate(Shim(), mbs, cfg, DistInfo(0, 1, 0), UpdateStats(grad_norms=[]))
        self.opt.step()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (`memact new-model --preset tiny --out DIR`)")
    ap.add_argument("--data", required=True, help="`memact rollout` JSONL (its segments are trained)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=8192, help="micro-batch token budget")
    ap.add_argument("--row-len", type=int, default=1280, help="batch.packed_row_len")
    ap.add_argument("--variants", default=",".join(LAYOUTS))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    bench = Bench(args.model, args.data, args.threads, args.max_tokens, args.row_len)
    seqs, useful, trained = bench.seqs, bench.useful, bench.trained
    variants = {name: bench.variant(name) for name in args.variants.split(",")}

    def run(name: str) -> float:
        return useful / bench.seconds(variants[name])

    for name in variants:  # warm-up: oneDNN kernel selection for these shapes
        run(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            times[name].append(run(name))
    print(f"{len(seqs)} segments, {useful} useful tokens ({trained} trained), micro-batch budget "
          f"{args.max_tokens}, row len {args.row_len}, {args.threads} thread(s), torch {torch.__version__}")
    base = statistics.median(times["naive"]) if "naive" in times else None
    for name, cfg_mbs in variants.items():
        _, mbs, computed, padded = cfg_mbs
        med = statistics.median(times[name])
        ratio = f"  x{med / base:.2f} vs naive" if base else ""
        print(f"{name:13s} {med:8,.0f} useful tok/s{ratio}  | {len(mbs)} micro-batches, {computed} computed "
              f"tokens, {padded} with padding | rounds: {', '.join(f'{x:,.0f}' for x in times[name])}")


if __name__ == "__main__":
    main()

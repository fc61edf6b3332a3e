"""Teacher-forced accuracy of a policy on expert trajectories, by kind of token.

A rollout score mixes everything the agent must do; this diagnostic says which skill is
missing. On the trained tokens (loss mask 1) of every segment of a trajectories file
(e.g. ``memact rollout --policy scripted``), it takes the argmax of the policy's next-token
logits and reports accuracy per kind of target token:

* ``value``: an attribute value (the note's and the final answer's content: recall),
* ``name``: an entity name (the search query: copying from the question),
* ``id``: a record id (``delete_ids``: copying from the record headers),
* ``attribute``: an attribute word (the search query's relation: copying from the question),
* ``other``: everything else (the format),

plus the mean NLL per kind. A model that learned the format and not recall shows ``other``
near 1 and ``value`` near chance (about 1/12 when it knows the attribute).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/teacher_forced.py --policy runs/tiny_sft \\
        --data runs/heldout_k2.jsonl [--max-segments 200]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def token_kinds(tokenizer) -> dict[int, str]:
    from memact.env.memory import ID_POOL
    from memact.env.task import ATTRIBUTES, NAME_POOL

    kinds: dict[int, str] = {}
    for kind, words in (("name", NAME_POOL), ("value", [v for vs in ATTRIBUTES.values() for v in vs]),
                        ("id", ID_POOL), ("attribute", list(ATTRIBUTES))):
        for w in words:
            ids = tokenizer.encode(w, add_special_tokens=False)
            if len(ids) == 1:
                kinds[ids[0]] = kind
    return kinds


def evaluate(policy: str, data: str, max_segments: int = 200) -> dict[str, dict[str, float]]:
    import torch

    from memact.models.model import load_policy

    model, tokenizer = load_policy(policy)
    model.eval()
    kinds = token_kinds(tokenizer)
    hits: dict[str, list[float]] = defaultdict(list)
    nll: dict[str, list[float]] = defaultdict(list)
    n = 0
    with open(data) as f, torch.no_grad():
        for line in f:
            for seg in json.loads(line)["segments"]:
                if n >= max_segments:
                    break
                n += 1
                prompt, resp, mask = seg["prompt_ids"], seg["response_ids"], seg["loss_mask"]
                ids = torch.tensor([prompt + resp])
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
                logp = torch.log_softmax(logits, -1)
                pred = logits.argmax(-1)
                for j, (t, m) in enumerate(zip(resp, mask)):
                    if m:
                        k = kinds.get(t, "other")
                        hits[k].append(float(pred[j] == t))
                        nll[k].append(-float(logp[j, t]))
    return {k: {"acc": sum(v) / len(v), "nll": sum(nll[k]) / len(v), "n": len(v)} for k, v in sorted(hits.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, nargs="+", help="model directories (several: one line each)")
    p.add_argument("--data", required=True, help="trajectories JSONL (held out from training)")
    p.add_argument("--max-segments", type=int, default=200)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    for policy in args.policy:
        if not Path(policy).is_dir():
            print(f"error: --policy {policy!r} is not a model directory", file=sys.stderr)
            return 2
        res = evaluate(policy, args.data, args.max_segments)
        print(policy + "  " + "  ".join(f"{k}: acc {v['acc']:.3f} nll {v['nll']:.2f} (n={v['n']})"
                                         for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

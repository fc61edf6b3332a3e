"""Share of the generated tokens a DCPO step trains, by segment sampling mode (``dcpo.segment_sampling``).

Scripted-expert trajectories stand in for a policy's (same segment structure: one segment per
context edit, plus one); groups of ``--n-traj`` per prompt, as a step would draw them.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/segment_share.py --objectives 1,2,4,6,8 --prompts 16
"""

from __future__ import annotations

import argparse
import random

from memact.agent.rollout import rollout
from memact.dcpo.sampling import sample_segments
from memact.trajectory import segment_trajectory


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default="1,2,4,6,8")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n-traj", type=int, default=8)
    p.add_argument("--n-seg", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"| K | segments / trajectory | all: trained share | round_robin {args.n_seg}: trained share "
          "| round_robin: final-answer segments trained |")
    print("|---|---|---|---|---|")
    rng = random.Random(args.seed)
    for k in map(int, args.objectives.split(",")):
        trajs = rollout("scripted", k, args.prompts * args.n_traj, seed=args.seed, progress=False)
        segs = [segment_trajectory(t.calls) for t in trajs]
        sizes = [[sum(s.loss_mask) for s in ss] for ss in segs]
        total = sum(map(sum, sizes))
        rr, last = 0, 0
        for g in range(args.prompts):
            members = range(g * args.n_traj, (g + 1) * args.n_traj)
            picks = sample_segments([len(segs[t]) for t in members], "round_robin", args.n_seg, rng)
            seen = set()
            for ti, si in picks:
                t = g * args.n_traj + ti
                if (t, si) not in seen:  # a segment drawn twice trains its tokens twice, not new ones
                    seen.add((t, si))
                    rr += sizes[t][si]
                    last += si == len(segs[t]) - 1
        print(f"| {k} | {sum(map(len, segs)) / len(segs):.1f} | 1.000 | {rr / total:.3f} | "
              f"{last / len(trajs):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

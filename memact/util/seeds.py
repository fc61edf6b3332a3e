"""Every seed derived from another comes from :func:`derive_seed`, one stream per purpose.

A stream folds its parts into the seed one at a time, ``s = s * multiplier + part``, with
the multipliers listed below. The multipliers are the ones each site used before they were
gathered here, so runs reproduce exactly across that change.
"""

from __future__ import annotations

STREAMS: dict[str, tuple[int, ...]] = {
    "task": (100_003,),  # (i): task i of make_tasks(n, k, seed)
    "corpus": (7_919,),  # (i): task i of the tokenizer's training corpus
    "history": (7_927,),  # (i): run i of `memact research histories`
    "mix": (7_933,),  # (j): the tasks of part j of a mix: task source
    "episode": (1,),  # (i): the record ids of episode i of run_episodes
    "demo_rollouts": (1,),  # (1000 * K): the demo's scripted data at K
    "dcpo_step": (1_000_003, 1_009),  # (step, rank): sampling and segment choice of a DCPO step
    "dcpo_prompts": (10_007, 31),  # (step[, K]): the prompts of a DCPO step (of one K when K are mixed)
    "dcpo_prompts_more": (10_009, 101, 97, 31),  # (step, round, rank[, K]): dynamic sampling's further prompts
    "dcpo_episodes_more": (1_000_033, 101, 97),  # (step, round, rank): their episodes' record ids
    "dcpo_control": (1_000_037, 1_013),  # (step, rank): the permutations of a shuffle control
    "sft_shuffle": (1_009,),  # (epoch): the segment order of an SFT epoch
}


def derive_seed(seed: int, stream: str, *parts: int) -> int:
    """The seed of ``stream`` for ``parts`` (at most as many as the stream has multipliers)."""
    try:
        mults = STREAMS[stream]
    except KeyError:
        raise ValueError(f"seed stream {stream!r}: expected one of {', '.join(STREAMS)}") from None
    if len(parts) > len(mults):
        raise ValueError(f"seed stream {stream!r} takes at most {len(mults)} parts, got {len(parts)}")
    s = int(seed)
    for m, p in zip(mults, parts):
        s = s * m + int(p)
    return s

"""Memory strategies, all run by the same agent loop.

- ``memact``: the learned ``prune_context`` tool; the policy edits its own context.
- ``full``: no memory tool; the history only grows and overflowing the budget ends the
  episode (the no-memory baseline, as Search-R1).
- ``sliding_window``: no memory tool; before each call only the last ``k`` records are kept.
- ``summarize``: no memory tool; when the context passes a threshold the policy is asked
  for a summary, which then replaces the whole history (the published summarisation
  baseline).

Strategies edit the working memory from outside the policy; DCPO segmentation handles
that like any other context edit (a new segment starts after it).
"""

from __future__ import annotations

from dataclasses import dataclass

SUMMARY_REQUEST = (
    "Your context is nearly full. Summarize everything you have found so far that you still need "
    "(answers as Q1: value; ...). The summary will replace the history."
)
SUMMARY_SAVED = "Context summarized; earlier records were removed."


@dataclass(frozen=True)
class Strategy:
    """How an episode's context is managed.

    Attributes:
        name: memact | full | sliding_window | summarize.
        window: records kept by ``sliding_window``.
        summarize_at: context share of the budget (0-1) past which ``summarize`` asks for a summary.
    """

    name: str = "memact"
    window: int = 2
    summarize_at: float = 0.7

    @property
    def memory_tool(self) -> bool:
        return self.name == "memact"


STRATEGIES = ("memact", "full", "sliding_window", "summarize")


def parse_strategy(spec: str) -> Strategy:
    """``memact``, ``full``, ``sliding_window[:K]`` or ``summarize[:FRACTION]``."""
    name, _, arg = spec.partition(":")
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {spec!r}; choose from {', '.join(STRATEGIES)}")
    try:
        if name == "sliding_window":
            return Strategy(name, window=int(arg) if arg else 2)
        if name == "summarize":
            frac = float(arg) if arg else 0.7
            if not 0 < frac < 1:
                raise ValueError
            return Strategy(name, summarize_at=frac)
    except ValueError:
        raise ValueError(f"bad strategy argument in {spec!r}: sliding_window:K (K >= 1) or summarize:F (0<F<1)") from None
    if arg:
        raise ValueError(f"strategy {name!r} takes no argument, got {spec!r}")
    return Strategy(name)

"""The one CPU-thread setting: ``run.threads`` in a config, else ``$MEMACT_THREADS``, else 1
on machines with up to 4 cores (torch's own default above that).

On 2 cores shared with any other work, 2 threads made tiny-model generation 5-25x slower than
1 and training about 3x slower (docs/training.md), hence the small-machine default.
"""

from __future__ import annotations

import os

THREADS_ENV = "MEMACT_THREADS"


def resolve_threads(requested: int = 0) -> int | None:
    """The thread count to use: ``requested`` if > 0, else the environment's, else the
    small-machine default; None leaves torch's default."""
    if requested > 0:
        return requested
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"${THREADS_ENV}={env!r}: expected a whole number >= 1") from None
        if n < 1:
            raise ValueError(f"${THREADS_ENV}={env!r}: expected a whole number >= 1")
        return n
    return 1 if (os.cpu_count() or 1) <= 4 else None


def set_threads(requested: int = 0) -> int:
    """Set torch's CPU threads by :func:`resolve_threads`; returns the count in force."""
    import torch

    n = resolve_threads(requested)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()

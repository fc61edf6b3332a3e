"""Which tasks a training step samples: the number of sub-questions K of each prompt over a run.

``stages``: the curriculum's K one after another, the run's steps split into equal stages.
``mixed``: every step's prompts cycle through the curriculum's K, so each K is sampled in every
step once there are at least as many prompts as K (with stages, a K no longer sampled drifted:
docs/reproduce.md, runs E and F). An empty curriculum samples ``objectives`` throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memact.env.sources import parse_source
from memact.env.task import Task
from memact.util.seeds import derive_seed

CURRICULUM_MODES = ("stages", "mixed")


@dataclass(frozen=True)
class Curriculum:
    """K per prompt and step.

    Attributes:
        objectives: K when ``ks`` is empty.
        ks: K per stage (``stages``) or the K to cycle through (``mixed``).
        mode: one of :data:`CURRICULUM_MODES`.
        source: the task source spec (``memact.env.sources``); file sources give the ``train`` split.
        retrieval: the tasks' search backend (``memact.env.retrieval``).
    """

    objectives: int = 2
    ks: tuple[int, ...] = field(default_factory=tuple)
    mode: str = "stages"
    source: str = "synthetic"
    retrieval: str = "task"

    def __post_init__(self) -> None:
        if self.mode not in CURRICULUM_MODES:
            raise ValueError(f"curriculum mode {self.mode!r}: expected one of {', '.join(CURRICULUM_MODES)}")

    def k_at(self, step: int, total_steps: int, prompt: int, prompts_per_step: int) -> int:
        """K of prompt ``prompt`` (0-based within the step) at ``step`` of a ``total_steps`` run."""
        if self.ks and self.mode == "mixed":
            return int(self.ks[(step * prompts_per_step + prompt) % len(self.ks)])
        if not self.ks or total_steps <= 0:
            return self.objectives
        stage = min(step * len(self.ks) // total_steps, len(self.ks) - 1)
        return int(self.ks[stage])

    def prompts(self, seed: int, step: int, n: int, total_steps: int, draw: tuple[int, ...] = ()) -> list[Task]:
        """The step's ``n`` prompts, in prompt order; each K's prompts come from their own seed
        when a step mixes K.

        ``draw`` names a further draw of the same step (dynamic sampling: ``(round, rank)``):
        other tasks, the same K per prompt index; ``()`` is the step's first draw.
        """
        ks = [self.k_at(step, total_steps, g, n) for g in range(n)]
        stream = ("dcpo_prompts_more", step, *draw) if draw else ("dcpo_prompts", step)
        source = parse_source(self.source, self.retrieval)
        if len(set(ks)) == 1:
            return source.tasks(n, ks[0], derive_seed(seed, *stream), split="train")
        by_k = {k: iter(source.tasks(ks.count(k), k, derive_seed(seed, *stream, k), split="train")) for k in set(ks)}
        return [next(by_k[k]) for k in ks]

"""The agent loop: many episodes at once, one batched engine call per step.

Each episode's next prompt is built from token spans (head ids + each surviving record's
ids + the generation prompt); every generation call is recorded with its exact prompt
ids, output ids and sampling log-probs, and the context length at that step.
"""

from __future__ import annotations

import sys

from memact.agent.chat import ChatRenderer
from memact.agent.strategies import SUMMARY_REQUEST, SUMMARY_SAVED, Strategy
from memact.engines.base import Engine, Generation, SamplingParams, engine_session
from memact.env.memory import Budget, Record
from memact.env.task import Task
from memact.env.tools import AgentEnv, StepResult
from memact.models.chatml import IM_END, IM_START, SYSTEM_PROMPT, SYSTEM_PROMPT_NO_MEMORY, parse_action
from memact.trajectory import Call, Trajectory
from memact.util.seeds import derive_seed


class Episode:
    """One task in flight: env, working memory as token spans, and the call log."""

    def __init__(self, task: Task, renderer: ChatRenderer, seed: int, strategy: Strategy, budget: Budget,
                 group: int = 0):
        self.task = task
        self.renderer = renderer
        self.strategy = strategy
        self.env: AgentEnv = task.make_env(seed=seed, memory_tool=strategy.memory_tool, budget=budget)
        system = self.env.system_prompt or (SYSTEM_PROMPT if strategy.memory_tool else SYSTEM_PROMPT_NO_MEMORY)
        self.head_ids = renderer.head_ids(system, self.env.user_text(), self.env.tools)
        self._summary_request_ids = renderer.encode(f"{IM_START}user\n{SUMMARY_REQUEST}{IM_END}\n")
        self.summarizing = False
        self.strategy_edits = 0
        self._edited = False
        self.calls: list[Call] = []
        self.context_lengths: list[int] = []
        self.done = False
        self.broken: str | None = None
        self.error: str | None = None
        self.group = group

    @property
    def records(self) -> list[Record]:
        return self.env.memory.records

    def prompt_ids(self) -> list[int]:
        return self.renderer.prompt_ids(self.head_ids, self.records)

    def next_prompt(self) -> list[int]:
        """The next call's prompt, after the strategy had its say."""
        st = self.strategy
        if st.name == "sliding_window" and len(self.records) > st.window:
            self.env.memory.drop([r.record_id for r in self.records[:-st.window]])
            self.strategy_edits += 1
            self._edited = True
        prompt = self.prompt_ids()
        if st.name == "summarize" and self.records and len(prompt) > st.summarize_at * self.env.budget.max_context_tokens:
            # Ask for a summary: the request is a user turn after the history.
            self.summarizing = True
            gen = self.renderer.generation_prompt_ids
            prompt = prompt[:len(prompt) - len(gen)] + self._summary_request_ids + gen
        return prompt

    def check_before_call(self, prompt: list[int]) -> bool:
        """End the episode if the next call would break a budget; True if it may go on."""
        broken = self.env.budget.broken(len(prompt), len(self.calls) + 1)
        if broken:
            self.broken, self.done = broken, True
        return not self.done

    def apply(self, prompt: list[int], gen: Generation) -> StepResult | None:
        """Record the call and apply the action it holds."""
        if gen.error is not None:
            self.error, self.done = gen.error, True
            return None
        self.calls.append(Call(prompt, list(gen.output_ids), list(gen.logprobs), gen.finish_reason,
                               edited_before=self._edited))
        self._edited = False
        self.context_lengths.append(len(prompt) + len(gen.output_ids))
        broken = self.env.budget.broken(len(prompt) + len(gen.output_ids), len(self.calls))
        if broken:
            self.broken, self.done = broken, True
            self.calls[-1].kind = "broken"
            return None
        text = self.renderer.decode(gen.output_ids)
        if self.summarizing:
            return self._replace_with_summary(gen, text)
        result = self.env.step(parse_action(text), text)
        self.calls[-1].kind = result.kind
        if result.done:
            self.done = True
            self.error = self.error or self.env.failure
            return result
        record = self.env.memory.get(result.record_id)
        record.ids = self.renderer.record_ids(gen.output_ids, result.response_text)
        return result

    def _replace_with_summary(self, gen: Generation, text: str) -> StepResult:
        """The summary becomes the only record; the request turn is not kept."""
        self.summarizing = False
        self.env.memory.drop(self.env.memory.ids())
        result = self.env.add_record(SUMMARY_SAVED, text.replace(IM_END, ""), "summary", summary=text)
        self.env.memory.get(result.record_id).ids = self.renderer.record_ids(gen.output_ids, result.response_text)
        self.calls[-1].kind = "summary"
        self.strategy_edits += 1
        return result

    def finish(self) -> Trajectory:
        reward = self.env.reward(self.broken or self.error)
        prompt_lens = [len(c.prompt_ids) for c in self.calls]
        metrics = {
            "steps": len(self.calls),
            "memory_actions": self.env.memory_actions,
            "strategy_edits": self.strategy_edits,
            "invalid_actions": self.env.invalid_actions,
            "peak_context_tokens": max(self.context_lengths, default=len(self.head_ids)),
            "mean_context_tokens": sum(prompt_lens) / len(prompt_lens) if prompt_lens else 0.0,
            "total_input_tokens": sum(prompt_lens),
            "total_output_tokens": sum(len(c.output_ids) for c in self.calls),
            "overflow": self.broken is not None,
            "overflow_reason": self.broken,
            "answered": self.env.answer is not None,
        }
        return Trajectory(self.task.task_id, reward, self.calls, metrics, self.env.correct, self.env.answer,
                          self.error, self.group)


def run_episodes(
    engine: Engine,
    tasks: list[Task],
    renderer: ChatRenderer,
    sampling: SamplingParams,
    budget: Budget | None = None,
    strategy: Strategy | str = "memact",
    seed: int = 0,
    groups: list[int] | None = None,
    progress: bool = True,
) -> list[Trajectory]:
    """Run one episode per task, all at once; one engine call per step over the active ones.

    Args:
        engine: anything with ``generate(prompts, sampling)``.
        tasks: one episode per entry (repeat a task for a group of rollouts).
        renderer: token-span renderer of the policy's tokenizer.
        sampling: sampling parameters of every call.
        budget: context and step limits.
        strategy: how context is managed (``memact``, ``full``, ``sliding_window``,
            ``summarize``; a :class:`Strategy` or its spec string).
        seed: episode i seeds its record ids from the ``episode`` stream of ``memact.util.seeds``.
        groups: group index of each task (trajectories of one prompt share it).
        progress: show a progress bar on stderr.
    """
    from memact.agent.strategies import parse_strategy

    strategy = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    budget = budget or Budget()
    groups = groups if groups is not None else list(range(len(tasks)))
    episodes = [Episode(t, renderer, derive_seed(seed, "episode", i), strategy, budget, g) for i, (t, g) in enumerate(zip(tasks, groups))]
    bar = _Progress(len(episodes), enabled=progress)
    with engine_session(engine):
        try:
            while True:
                active, prompts = [], []
                for ep in episodes:
                    if ep.done:
                        continue
                    prompt = ep.next_prompt()
                    if ep.check_before_call(prompt):
                        active.append(ep)
                        prompts.append(prompt)
                bar.update(sum(ep.done for ep in episodes))
                if not active:
                    break
                gens = engine.generate(prompts, sampling)
                if len(gens) != len(prompts):
                    raise RuntimeError(f"engine returned {len(gens)} generations for {len(prompts)} prompts")
                for ep, prompt, gen in zip(active, prompts, gens):
                    ep.apply(prompt, gen)
        finally:
            bar.close()
    return [ep.finish() for ep in episodes]


class _Progress:
    """A rich progress bar on stderr, silent when disabled or not a terminal-less test."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(file=sys.stderr), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("episodes", total=total)

    def update(self, completed: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

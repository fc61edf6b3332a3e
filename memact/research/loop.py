"""The research loop: baseline, then propose -> commit -> run -> log -> keep or reset.

Crash safety. The order of writes in one experiment is:

1. commit the proposal (HEAD is now an un-logged experiment commit);
2. run it; if it is not kept, ``git reset --hard`` to the best commit;
3. append its row to results.tsv (the durable record of the experiment);
4. update the history and write state.json (atomic rename), then context.tsv from it.

A ``kill -9`` anywhere loses at most the experiment in flight. On start, :func:`recover`
replays any results rows newer than the state (a kill between steps 3 and 4), then resets
the work tree to the best commit if it is dirty or HEAD is an un-logged experiment commit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from memact.research import workspace as ws
from memact.research.endpoint import EndpointError
from memact.research.history import MemoryPolicy, Outcome, ResearchMemory, diff_summary
from memact.research.proposers import Proposal, Proposer
from memact.research.results import (
    BASELINE_PREFIX,
    CONTEXT_HEADER,
    ResultRow,
    append_result,
    atomic_write_bytes,
    baseline_best,
    noise_margin,
    read_json,
    read_results,
    repair_tsv,
    should_keep,
    write_json,
)
from memact.research.runner import run_training

STATE_VERSION = 1
MAX_PROPOSER_FAILURES = 3  # consecutive endpoint failures before the loop gives up


@dataclass
class RunConfig:
    """Settings of one `memact research run`.

    Attributes:
        budget_s: training seconds per run (train.py reads MEMACT_BUDGET_S); the run is
            killed at 2x. Fixed for a workspace: results under two budgets do not compare.
        experiments: total experiments wanted in the workspace (a resumed run does the rest).
        proposer: ``mutate``, ``openai:MODEL`` or ``policy:MODEL_DIR``.
        memory: ``heuristic``, ``none`` or ``policy:MODEL_DIR``.
        baseline_runs: repeats of the unchanged train.py that measure the noise margin (>= 2).
        context_budget: context length, in proxy tokens, above which the memory policy acts.
        seed: seeds the mutate proposer and the record ids.
    """

    budget_s: float
    experiments: int
    proposer: str = "mutate"
    memory: str = "heuristic"
    baseline_runs: int = 3
    context_budget: int = 4000
    seed: int = 0

    def check(self) -> None:
        if self.budget_s <= 0:
            raise ValueError(f"--budget must be positive seconds, got {self.budget_s}")
        if self.experiments < 0:
            raise ValueError(f"--experiments must be >= 0, got {self.experiments}")
        if self.baseline_runs < 2:
            raise ValueError(f"--baseline-runs must be >= 2 to measure a noise margin, got {self.baseline_runs}")
        if self.context_budget <= 0:
            raise ValueError(f"--context-budget must be positive tokens, got {self.context_budget}")


class ResearchError(RuntimeError):
    """The loop cannot go on (a broken baseline, a workspace that does not match its state)."""


def _path(workdir: str, name: str) -> str:
    return os.path.join(workdir, name)


class ResearchLoop:
    """One workspace's loop. Build it, then call :meth:`run`."""

    def __init__(
        self,
        workdir: str,
        config: RunConfig,
        proposer: Proposer,
        memory_policy: MemoryPolicy,
        log: Callable[[str], None] | None = None,
    ):
        config.check()
        self.workdir = os.path.abspath(workdir)
        self.config = config
        self.proposer = proposer
        self.memory_policy = memory_policy
        self.log = log or (lambda msg: print(msg, flush=True))
        self.program_text = ws.read_file(self.workdir, "program.md")
        self.state: dict[str, Any] = {}
        self.memory: ResearchMemory | None = None

    # ---- state ---------------------------------------------------------------------------

    def _fresh_state(self) -> dict[str, Any]:
        if ws.is_dirty(self.workdir):
            raise ResearchError(
                f"{self.workdir} has uncommitted changes: commit or discard them before the first run"
            )
        base = ws.head(self.workdir)
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "base_commit": base,
            "best_commit": base,
            "best_val": None,
            "best_experiment": None,
            "best_description": "unchanged template",
            "baseline": [],
            "margin": None,
            "experiments_done": 0,
            "rows_logged": 0,
            "context_log": [],
            "memory": None,
        }

    def _save(self) -> None:
        assert self.memory is not None
        self.state["memory"] = self.memory.to_dict()
        write_json(_path(self.workdir, ws.STATE_FILE), self.state)
        lines = ["\t".join(CONTEXT_HEADER)] + ["\t".join(str(v) for v in row) for row in self.state["context_log"]]
        atomic_write_bytes(_path(self.workdir, ws.CONTEXT_FILE), ("\n".join(lines) + "\n").encode())

    def recover(self) -> None:
        """Load or create the state, replay rows it has not seen, and clean the work tree."""
        results_path = _path(self.workdir, ws.RESULTS_FILE)
        for name in (ws.RESULTS_FILE, ws.CONTEXT_FILE):
            if repair_tsv(_path(self.workdir, name)):
                self.log(f"dropped a partial last line from {name}")
        state_path = _path(self.workdir, ws.STATE_FILE)
        if os.path.exists(state_path):
            self.state = read_json(state_path)
            old_budget = self.state["config"]["budget_s"]
            if float(old_budget) != float(self.config.budget_s):
                raise ResearchError(
                    f"{self.workdir} was run with --budget {old_budget:g}; pass the same budget "
                    f"(got {self.config.budget_s:g}): results under different budgets do not compare"
                )
            self.state["config"] = asdict(self.config)
            self.memory = ResearchMemory.from_dict(self.program_text, self.state["memory"])
        else:
            self.state = self._fresh_state()
            self.memory = ResearchMemory(self.program_text, seed=self.config.seed)
            if os.path.exists(results_path):
                raise ResearchError(f"{results_path} exists but {state_path} does not: not a workspace this tool started")

        rows = read_results(results_path)
        for row in rows[self.state["rows_logged"] :]:
            self.log(f"replaying a logged row the state had not recorded: {row.description}")
            self._account(row, diff="(replayed after an interruption)")
        if ws.head(self.workdir) != self.state["best_commit"] or ws.is_dirty(self.workdir):
            self.log(
                f"resetting {self.workdir} to the best commit {ws.short(self.state['best_commit'])} "
                f"(HEAD {ws.short(ws.head(self.workdir))} was un-logged or the tree was dirty)"
            )
            ws.reset_to(self.workdir, self.state["best_commit"])
        self._save()

    # ---- bookkeeping of one logged row ------------------------------------------------------

    def _account(self, row: ResultRow, diff: str) -> None:
        """Fold one results row into the state and the history (also used to replay rows)."""
        assert self.memory is not None
        st = self.state
        st["rows_logged"] += 1
        if row.is_baseline:
            if row.val_bpb is not None:
                st["baseline"].append(row.val_bpb)
            if len(st["baseline"]) == self.config.baseline_runs and st["margin"] is None:
                st["margin"] = noise_margin(st["baseline"])
                st["best_val"] = baseline_best(st["baseline"])
                st["best_experiment"] = 0
                runs = "/".join(f"{v:.4f}" for v in st["baseline"])
                st["best_description"] = f"baseline, mean of {len(st['baseline'])} runs"
                self.memory.add_outcome(
                    Outcome(0, "keep", st["best_val"], f"baseline runs {runs}; noise margin {st['margin']:.4f}",
                            "no change", st["best_commit"][:7])
                )
                self._log_context(0)
            return
        st["experiments_done"] += 1
        exp = st["experiments_done"]
        if row.status == "keep":
            st["best_commit"] = ws.git(self.workdir, "rev-parse", row.commit)
            st["best_val"] = row.val_bpb
            st["best_experiment"] = exp
            st["best_description"] = row.description
        self.memory.add_outcome(Outcome(exp, row.status, row.val_bpb, row.description, diff, row.commit))
        self._log_context(exp)

    def best_block(self) -> str:
        st = self.state
        if st["margin"] is None:
            return "no baseline yet"
        base = baseline_best(st["baseline"])
        return (
            f"val_bpb {st['best_val']:.4f} at commit {ws.short(st['best_commit'])} "
            f"(exp {st['best_experiment']}: {st['best_description']}).\n"
            f"Baseline {base:.4f} over {len(st['baseline'])} runs; noise margin {st['margin']:.4f} (max - min of "
            f"the baseline runs): a change is kept only if its val_bpb < {st['best_val'] - st['margin']:.4f}."
        )

    def _log_context(self, exp: int) -> None:
        """Let the memory policy act, then log the context length with and without pruning."""
        assert self.memory is not None
        block = self.best_block()
        action = self.memory_policy.act(self.memory, block, self.config.context_budget, self.state["best_experiment"])
        if action:
            self.log(f"  memory: {action}")
        self.state["context_log"].append(
            [exp, self.memory.tokens(block), self.memory.unpruned_tokens(block), action or "-"]
        )

    # ---- one run -------------------------------------------------------------------------

    def _run_logged(self, label: str) -> tuple[str, float | None, float | None, str]:
        """Run train.py; returns (status ok/crash/timeout, val_bpb, memory_gb, error)."""
        log_path = _path(self.workdir, os.path.join(ws.LOG_DIR, f"{label}.log"))
        result = run_training(self.workdir, self.config.budget_s, log_path)
        return result.status, result.val_bpb, result.memory_gb, result.error

    def _log_row(self, row: ResultRow, diff: str) -> None:
        append_result(_path(self.workdir, ws.RESULTS_FILE), row)
        self._account(row, diff)
        self._save()

    def baseline(self) -> None:
        """Run the unchanged train.py until ``baseline_runs`` good runs are logged."""
        st = self.state
        while len(st["baseline"]) < self.config.baseline_runs:
            k = len(st["baseline"]) + 1
            status, val, mem, error = self._run_logged(f"baseline_{k}")
            desc = f"{BASELINE_PREFIX} {k}/{self.config.baseline_runs}"
            if status != "ok":
                self._log_row(ResultRow(ws.short(st["best_commit"]), None, mem, "crash", f"{desc} [{status}: {error}]"), "")
                raise ResearchError(
                    f"the baseline train.py failed ({status}: {error}); see {ws.LOG_DIR}/baseline_{k}.log"
                )
            self._log_row(ResultRow(ws.short(st["best_commit"]), val, mem, "keep", desc), "no change")
            self.log(f"baseline {k}/{self.config.baseline_runs}: val_bpb {val:.6f}")
        self.log(f"baseline {st['best_val']:.6f} (mean), noise margin {st['margin']:.6f} (max - min)")

    def experiment(self) -> bool:
        """Propose, run, log and keep-or-reset one experiment. False when the proposer keeps failing."""
        assert self.memory is not None
        st = self.state
        exp = st["experiments_done"] + 1
        best_source = ws.read_file(self.workdir)
        context = self.memory.context_text(self.best_block())
        try:
            proposal: Proposal = self.proposer.propose(context, best_source, exp)
        except (EndpointError, ValueError) as err:
            st["proposer_failures"] = st.get("proposer_failures", 0) + 1
            self._log_row(ResultRow("-", None, None, "crash", f"proposer failed: {err}"), "no change")
            self.log(f"exp {exp}: proposer failed: {err}")
            return st["proposer_failures"] < MAX_PROPOSER_FAILURES
        st["proposer_failures"] = 0

        if proposal.patch is not None:
            try:
                ws.apply_patch(self.workdir, proposal.patch)
            except ws.PatchRejected as err:
                reason = " ".join(str(err).split())[:200]
                self._log_row(ResultRow("-", None, None, "crash", f"rejected patch: {reason} ({proposal.description})"),
                              "no change")
                self.log(f"exp {exp}: rejected patch: {reason}")
                return True
        elif proposal.new_source is not None:
            ws.write_file(self.workdir, proposal.new_source)
        new_source = ws.read_file(self.workdir)
        if new_source == best_source:
            self._log_row(ResultRow("-", None, None, "crash", f"rejected proposal: train.py unchanged ({proposal.description})"),
                          "no change")
            return True

        diff = diff_summary(best_source, new_source)
        commit = ws.commit_file(self.workdir, ws.EDITABLE_FILE, f"exp {exp}: {proposal.description}")
        status, val, mem, error = self._run_logged(f"exp_{exp:03d}")
        keep = status == "ok" and should_keep(val, st["best_val"], st["margin"])
        if not keep:
            ws.reset_to(self.workdir, st["best_commit"])
        outcome = "keep" if keep else ("discard" if status == "ok" else "crash")
        desc = proposal.description if status == "ok" else f"{proposal.description} [{status}: {error}]"
        best_before = st["best_val"]
        self._log_row(ResultRow(ws.short(commit), val, mem, outcome, desc), diff)
        bpb = "-" if val is None else f"{val:.6f}"
        ctx = st["context_log"][-1]
        self.log(
            f"exp {exp}/{self.config.experiments} {outcome:7s} val_bpb {bpb} (best {best_before:.6f}, "
            f"margin {st['margin']:.6f}) {proposal.description} [context {ctx[1]}/{ctx[2]} tokens]"
        )
        return True

    def run(self) -> int:
        """Recover, run the baseline, then experiments until ``experiments`` are logged. Exit code."""
        self.recover()
        try:
            self.baseline()
            while self.state["experiments_done"] < self.config.experiments:
                if not self.experiment():
                    self.log(f"giving up: the proposer failed {MAX_PROPOSER_FAILURES} times in a row")
                    return 1
        except ResearchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        finally:
            self._plot()
        st = self.state
        self.log(
            f"done: {st['experiments_done']} experiments, best val_bpb {st['best_val']:.6f} "
            f"at {ws.short(st['best_commit'])} (baseline {baseline_best(st['baseline']):.6f}, "
            f"margin {st['margin']:.6f})"
        )
        return 0

    def _plot(self) -> None:
        from memact.research.plots import write_plots

        if os.path.exists(_path(self.workdir, ws.RESULTS_FILE)):
            write_plots(self.workdir)

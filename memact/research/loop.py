"""The research loop: baseline, then propose -> commit -> run -> log -> keep or reset.

Crash safety. The order of writes in one experiment is:

1. commit the proposal (HEAD is now an un-logged experiment commit);
2. run it, then restore the work tree to the new best commit (the experiment's own commit
   when it is kept, the old best otherwise), whatever the run did to the files;
3. append its row to results.tsv (the durable record of the experiment);
4. update the history and write state.json (atomic rename), then context.tsv from it.

The state counts the rows it has folded in (``rows_logged``), so a row is either in the
state or it is not, never half: on start, :func:`recover` replays the rows after that count
(a kill between steps 3 and 4) through the same bookkeeping, which cannot fail (record ids
never run out; a memory policy that fails is logged and skipped), so a resume never
wedges on a row. It then restores the work tree to the best commit if it is dirty, HEAD is
an un-logged experiment commit, or train.py is missing or mangled. A ``kill -9`` anywhere
loses at most the experiment in flight.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from memact.research import workspace as ws
from memact.research.endpoint import EndpointError
from memact.research.history import MemoryPolicy, Outcome, ResearchMemory, diff_summary
from memact.research.proposers import Proposal, Proposer, constant_values
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
from memact.research.runner import KILL_FACTOR, check_budget, kill_workspace_processes, run_training

STATE_VERSION = 1
MAX_PROPOSER_FAILURES = 3  # consecutive endpoint failures before the loop gives up
STARTUP_BUDGET_S = 0.001  # the budget of the start-up run: what is left is start-up and evaluation
STARTUP_LIMIT_S = 120.0  # the start-up run is killed after this (or 2x the budget, if longer)
STARTUP_LOG = "startup"
DESCRIPTION_CHARS = 200


def one_line(text: Any, limit: int = DESCRIPTION_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters: control characters and
    line breaks become spaces, lone surrogates U+FFFD (so it fits a TSV row, a git message, a log)."""
    text = str(text).encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)
    return " ".join(text.split())[:limit]


@dataclass
class ProposerFailure:
    """Why the proposer gave no proposal (logged as a ``crash`` row ``proposer failed: ...``)."""

    reason: str
    traceback: str = ""


def propose_or_failure(proposer: Proposer, context_text: str, best_source: str, experiment: int
                       ) -> Proposal | ProposerFailure:
    """Ask the proposer for the next experiment. Never raises (an ``Exception``).

    A proposal comes back with a one-line description; an endpoint error, a reply the
    proposer cannot use (:class:`~memact.research.proposers.ReplyError`) or any other
    exception of the proposer, or something that is not a Proposal, comes back as a
    :class:`ProposerFailure` with the reason (and the traceback for an unexpected exception).
    """
    try:
        proposal = proposer.propose(context_text, best_source, experiment)
    except (EndpointError, ValueError) as err:  # ReplyError is a ValueError
        return ProposerFailure(one_line(err, 300))
    except Exception as err:  # a bug or an unforeseen reply: the loop logs it and goes on
        return ProposerFailure(one_line(f"{type(err).__name__}: {err}", 300), traceback.format_exc())
    if not isinstance(proposal, Proposal):
        return ProposerFailure(f"the proposer returned a {type(proposal).__name__}, not a Proposal")
    for name in ("new_source", "patch"):
        value = getattr(proposal, name)
        if value is not None and not isinstance(value, str):
            return ProposerFailure(f"the proposal's {name} is a {type(value).__name__}, not text")
    description = one_line(proposal.description) if isinstance(proposal.description, str) else ""
    return Proposal(description or "(no description)", proposal.new_source, proposal.patch)


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
        self.budget_s = check_budget(self.budget_s, "--budget")
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
        self.program_text = ""  # read from git by recover(): the work tree may be mangled
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

    def _template_constants(self) -> dict[str, str]:
        """The constants of the base commit's train.py, the baseline a ``policy:`` memory is told of."""
        try:
            return constant_values(ws.show_file(self.workdir, self.state["base_commit"], "train.py"))
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # not Python: the policy sees no baseline
            return {}

    def recover(self) -> None:
        """Load or create the state, replay rows it has not seen, and restore the work tree."""
        killed = kill_workspace_processes(self.workdir)
        if killed:
            self.log(f"killed {killed} process(es) an earlier run in {self.workdir} left behind")
        if ws.clear_stale_lock(self.workdir):
            self.log("removed a stale .git/index.lock (a git command was killed with the loop)")
        results_path = _path(self.workdir, ws.RESULTS_FILE)
        for name in (ws.RESULTS_FILE, ws.CONTEXT_FILE):
            if repair_tsv(_path(self.workdir, name)):
                self.log(f"dropped a partial last line from {name}")
        state_path = _path(self.workdir, ws.STATE_FILE)
        if os.path.exists(state_path):
            self.state = read_json(state_path)
            self._check_budget_on_resume()
            self.state["config"] = asdict(self.config)
            self.program_text = ws.show_file(self.workdir, self.state["best_commit"], "program.md")
            self.memory = ResearchMemory.from_dict(self.program_text, self.state["memory"])
        else:
            self.state = self._fresh_state()
            self.program_text = ws.show_file(self.workdir, self.state["best_commit"], "program.md")
            self.memory = ResearchMemory(self.program_text, seed=self.config.seed, baseline=self._template_constants())
            if os.path.exists(results_path):
                raise ResearchError(f"{results_path} exists but {state_path} does not: not a workspace this tool started")

        rows = read_results(results_path)
        if len(rows) < self.state["rows_logged"]:
            raise ResearchError(
                f"{results_path} has {len(rows)} rows but {state_path} has folded in {self.state['rows_logged']}: "
                f"the results file was truncated or edited; restore it (the state cannot be rebuilt without it)"
            )
        for row in rows[self.state["rows_logged"] :]:
            self.log(f"replaying a logged row the state had not recorded: {row.description}")
            self._account(row, diff="(replayed after an interruption)")
        problem = ws.editable_problem(self.workdir)
        if ws.head(self.workdir) != self.state["best_commit"] or ws.is_dirty(self.workdir) or problem:
            self.log(
                f"resetting {self.workdir} to the best commit {ws.short(self.state['best_commit'])} "
                f"(HEAD {ws.short(ws.head(self.workdir))} was un-logged or the tree was dirty"
                + (f": {problem})" if problem else ")")
            )
            ws.restore(self.workdir, self.state["best_commit"])
        self._save()

    def _check_budget_on_resume(self) -> None:
        """The budget is fixed once the baseline is complete; before that a new one starts it afresh."""
        st = self.state
        old = st["config"]["budget_s"]
        try:
            same = float(old) == float(self.config.budget_s)
        except (TypeError, ValueError):
            same = False
        if same:
            return
        if st["margin"] is None and st["experiments_done"] == 0:
            earlier = (f" (its {len(st['baseline'])} earlier run(s) stay in {ws.RESULTS_FILE} but no longer count)"
                       if st["baseline"] else "")
            self.log(f"the baseline under --budget {old:g} was not complete: starting it under "
                     f"--budget {self.config.budget_s:g}{earlier}")
            st["baseline"] = []
            return
        raise ResearchError(
            f"{self.workdir} was run with --budget {old:g}; pass the same budget "
            f"(got {self.config.budget_s:g}): results under different budgets do not compare"
        )

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
        try:
            action = self.memory_policy.act(self.memory, block, self.config.context_budget,
                                            self.state["best_experiment"])
        except Exception as err:  # a broken policy must not stop the bookkeeping (nor a resume)
            action = f"memory policy failed ({type(err).__name__}: {err}); nothing pruned"
        action = one_line(action, 300) if action else ""  # the policy's words end up in a TSV and a log
        if action:
            self.log(f"  memory: {action}")
        self.state["context_log"].append(
            [exp, self.memory.tokens(block), self.memory.unpruned_tokens(block), action or "-"]
        )

    # ---- one run -------------------------------------------------------------------------

    def _run_logged(self, label: str) -> tuple[str, float | None, float | None, str]:
        """Run train.py; returns (status ok/crash/timeout, val_bpb, memory_gb, error)."""
        log_path = _path(self.workdir, os.path.join(ws.LOG_DIR, f"{label}.log"))
        result = run_training(self.workdir, self.config.budget_s, log_path, run_key=f"seed{self.config.seed}-{label}")
        return result.status, result.val_bpb, result.memory_gb, result.error

    def _log_row(self, row: ResultRow, diff: str) -> None:
        append_result(_path(self.workdir, ws.RESULTS_FILE), row)
        self._account(row, diff)
        self._save()

    def _startup_run(self) -> float:
        """Seconds train.py takes with (next to) no training: its start-up and evaluation."""
        limit = max(STARTUP_LIMIT_S, KILL_FACTOR * self.config.budget_s)
        log_name = os.path.join(ws.LOG_DIR, f"{STARTUP_LOG}.log")
        result = run_training(self.workdir, STARTUP_BUDGET_S, _path(self.workdir, log_name), kill_after_s=limit)
        ws.restore(self.workdir, self.state["best_commit"])
        if result.status == "timeout":
            raise ResearchError(f"train.py did not finish a run with a {STARTUP_BUDGET_S:g} s budget within "
                                f"{limit:g} s, so its start-up is too long for --budget {self.config.budget_s:g}; "
                                f"see {log_name}")
        if result.status != "ok":  # e.g. a script that cannot evaluate after 0 steps: a lower bound
            self.log(f"the start-up run of train.py failed ({result.error[:120]}); "
                     f"its {result.wall_seconds:.1f} s count as the start-up")
        return result.wall_seconds

    def check_startup(self) -> None:
        """Refuse a budget that no run could meet: one no longer than the workspace's start-up.

        The start-up is measured once per workspace by running train.py with a budget of
        ``STARTUP_BUDGET_S`` (its wall time is start-up plus evaluation) and kept in the
        state as ``startup_s``. A run takes at least budget + start-up and is killed at 2x
        the budget, so a budget <= the start-up can never pass. A first measurement may be
        slow (cold caches), so a refusal is measured once more first.
        """
        st = self.state
        if st.get("startup_s") is None:
            st["startup_s"] = self._startup_run()
            self._save()
        if self.config.budget_s <= st["startup_s"]:
            st["startup_s"] = min(st["startup_s"], self._startup_run())
            self._save()
        if self.config.budget_s <= st["startup_s"]:
            raise ResearchError(
                f"--budget {self.config.budget_s:g} s is shorter than this workspace's start-up: train.py takes "
                f"{st['startup_s']:.1f} s to start and evaluate with no training (logs/{STARTUP_LOG}.log), "
                f"so every run would pass the kill at 2x the budget ({KILL_FACTOR * self.config.budget_s:g} s). "
                f"Use a --budget above {st['startup_s']:.1f} s ({math.ceil(2 * st['startup_s'])} s or more leaves "
                f"room); nothing is fixed until the baseline is complete"
            )

    def baseline(self) -> None:
        """Run the unchanged train.py until ``baseline_runs`` good runs are logged."""
        st = self.state
        if len(st["baseline"]) < self.config.baseline_runs:
            self.check_startup()
        while len(st["baseline"]) < self.config.baseline_runs:
            k = len(st["baseline"]) + 1
            status, val, mem, error = self._run_logged(f"baseline_{k}")
            ws.restore(self.workdir, st["best_commit"])
            desc = f"{BASELINE_PREFIX} {k}/{self.config.baseline_runs}"
            if status != "ok":
                self._log_row(ResultRow(ws.short(st["best_commit"]), None, mem, "crash", f"{desc} [{status}: {error}]"), "")
                hint = f" (start-up {st['startup_s']:.1f} s)" if status == "timeout" and st.get("startup_s") else ""
                raise ResearchError(
                    f"the baseline train.py failed ({status}: {error}){hint}; see {ws.LOG_DIR}/baseline_{k}.log"
                )
            self._log_row(ResultRow(ws.short(st["best_commit"]), val, mem, "keep", desc), "no change")
            self.log(f"baseline {k}/{self.config.baseline_runs}: val_bpb {val:.6f}")
        line = (f"baseline {baseline_best(st['baseline']):.6f} (mean of {len(st['baseline'])} runs), "
                f"noise margin {st['margin']:.6f} (max - min)")
        if st["best_experiment"]:
            line += f"; best {st['best_val']:.6f} at exp {st['best_experiment']} ({ws.short(st['best_commit'])})"
        self.log(line)

    def _apply(self, proposal: Proposal) -> str | None:
        """Put the proposal into the work tree; the reason it is refused, or None.

        On a refusal the work tree is restored to the best commit, whatever the proposal did.
        """
        try:
            if proposal.patch is not None:
                ws.apply_patch(self.workdir, proposal.patch)
            elif proposal.new_source is not None:
                ws.write_file(self.workdir, proposal.new_source)
            problem = ws.editable_problem(self.workdir)
        except ws.PatchRejected as err:
            problem = str(err)
        except (UnicodeError, OSError, ValueError) as err:
            problem = f"{type(err).__name__}: {err}"
        if problem is not None:
            ws.restore(self.workdir, self.state["best_commit"])
        return None if problem is None else one_line(problem)

    def experiment(self) -> bool:
        """Propose, run, log and keep-or-reset one experiment. False when the proposer keeps failing."""
        assert self.memory is not None
        st = self.state
        exp = st["experiments_done"] + 1
        best_source = ws.read_file(self.workdir)
        context = self.memory.context_text(self.best_block())
        got = propose_or_failure(self.proposer, context, best_source, exp)
        if isinstance(got, ProposerFailure):
            st["proposer_failures"] = st.get("proposer_failures", 0) + 1
            if got.traceback:
                os.makedirs(_path(self.workdir, ws.LOG_DIR), exist_ok=True)
                with open(_path(self.workdir, os.path.join(ws.LOG_DIR, f"exp_{exp:03d}.proposer.log")), "w",
                          encoding="utf-8", errors="replace") as f:
                    f.write(got.traceback)
            self._log_row(ResultRow("-", None, None, "crash", f"proposer failed: {got.reason}"), "no change")
            self.log(f"exp {exp}: proposer failed: {got.reason}")
            return st["proposer_failures"] < MAX_PROPOSER_FAILURES
        st["proposer_failures"] = 0
        proposal = got

        problem = self._apply(proposal)
        if problem is not None:
            kind = "patch" if proposal.patch is not None else "proposal"
            self._log_row(ResultRow("-", None, None, "crash", f"rejected {kind}: {problem[:200]} ({proposal.description})"),
                          "no change")
            self.log(f"exp {exp}: rejected {kind}: {problem}")
            return True
        new_source = ws.read_file(self.workdir)
        if new_source == best_source:
            ws.restore(self.workdir, st["best_commit"])  # e.g. a patch that only touched whitespace git ignores
            self._log_row(ResultRow("-", None, None, "crash", f"rejected proposal: train.py unchanged ({proposal.description})"),
                          "no change")
            return True

        diff = diff_summary(best_source, new_source)
        commit = ws.commit_file(self.workdir, ws.EDITABLE_FILE, f"exp {exp}: {proposal.description}")
        status, val, mem, error = self._run_logged(f"exp_{exp:03d}")
        keep = status == "ok" and should_keep(val, st["best_val"], st["margin"])
        # Whatever the run did to the files (deleted train.py, edited prepare.py...), the tree
        # becomes the new best commit again: this experiment's if kept, the old best if not.
        ws.restore(self.workdir, commit if keep else st["best_commit"])
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
        try:
            self.recover()
            self.baseline()
            while self.state["experiments_done"] < self.config.experiments:
                if not self.experiment():
                    self.log(f"giving up: the proposer failed {MAX_PROPOSER_FAILURES} times in a row")
                    return 1
        except (ResearchError, ws.GitError) as err:
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

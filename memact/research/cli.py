"""`memact research init|run|plot`: the autoresearch loop from the command line."""

from __future__ import annotations

import argparse
import sys

RUN_EPILOG = """\
proposers: mutate (offline), openai:MODEL (OPENAI_BASE_URL, OPENAI_API_KEY),
           policy:MODEL_DIR (serve it with `memact serve MODEL_DIR`, set MEMACT_POLICY_URL)
memory:    heuristic, none, window, expert (the history task's scripted expert, in process),
           policy:MODEL_DIR (same endpoint as above)
Re-running on the same DIR resumes: --experiments is the total wanted, not the number to add.
"""


def budget_seconds(text: str) -> float:
    """argparse type of ``--budget``: a finite number of seconds > 0 (not nan, inf or 0)."""
    from memact.research.runner import check_budget

    try:
        return check_budget(text, "--budget")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--budget ")) from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `research` and its sub-commands on the top-level `memact` parser."""
    research = subparsers.add_parser(
        "research", help="autoresearch loop whose history the memory policy curates",
        description="An agent improves train.py experiment by experiment; see docs/research.md.",
    )
    research.set_defaults(func=lambda args: (research.print_help(), 2)[1])
    sub = research.add_subparsers(dest="research_command", metavar="SUBCOMMAND")

    init = sub.add_parser("init", help="create a workspace (git repo with prepare.py, train.py, program.md)")
    init.add_argument("dir", help="new or empty directory")
    init.add_argument("--template", choices=["cpu", "gpu", "surrogate"], default="cpu",
                      help="cpu: small GPT, 60 s default budget; gpu: sized for one H100, 300 s; surrogate: the same "
                      "constants scored by a known response surface in milliseconds (for studying long histories)")
    init.set_defaults(func=cmd_init)

    run = sub.add_parser("run", help="run (or resume) the experiment loop in a workspace", epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("dir", help="a workspace made by `memact research init`")
    run.add_argument("--budget", type=budget_seconds, required=True,
                     help="training seconds per run (finite, > 0, longer than train.py's start-up); killed at 2x")
    run.add_argument("--experiments", type=int, required=True, help="total experiments wanted (resume-aware)")
    run.add_argument("--proposer", default="mutate",
                     help="mutate | context (offline, reads only its context) | openai:MODEL | policy:MODEL_DIR "
                     "(default mutate)")
    run.add_argument("--memory", default="heuristic", help="heuristic | none | window (oldest records dropped to fit the budget) | expert (the history "
                     "expert, in process) | policy:MODEL_DIR "
                     "(default heuristic)")
    run.add_argument("--baseline-runs", type=int, default=3, help="repeats of the baseline for the noise margin (>= 2)")
    run.add_argument("--context-budget", type=int, default=4000,
                     help="proxy tokens of proposer context above which the memory acts (default 4000)")
    run.add_argument("--seed", type=int, default=0, help="seed of the mutate proposer and the record ids")
    run.set_defaults(func=cmd_run)

    hist = sub.add_parser("histories", help="experiment histories on the surrogate template, for the memory "
                          "policy's history tasks (--data history:FILE)")
    hist.add_argument("--out", required=True, help="JSONL file to write (one run a line; docs/research.md)")
    hist.add_argument("--runs", type=int, default=40, help="runs to make (default 40)")
    hist.add_argument("--experiments", type=int, default=60, help="experiments a run (default 60)")
    hist.add_argument("--seed", type=int, default=0, help="run i is seeded from the 'history' stream of this seed")
    hist.set_defaults(func=cmd_histories)

    plot = sub.add_parser("plot", help="redraw progress.png and context.png from the workspace's logs")
    plot.add_argument("dir")
    plot.set_defaults(func=cmd_plot)


def cmd_init(args: argparse.Namespace) -> int:
    from memact.research.workspace import init_workspace

    try:
        commit = init_workspace(args.dir, args.template)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"workspace {args.dir} from the {args.template} template at commit {commit[:7]}")
    print(f"next: memact research run {args.dir} --budget SECONDS --experiments N --proposer mutate")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import os

    from memact.research.endpoint import PolicyUnavailable
    from memact.research.history import make_memory_policy
    from memact.research.loop import ResearchError, ResearchLoop, RunConfig
    from memact.research.proposers import make_proposer
    from memact.research.workspace import STATE_FILE

    missing = [name for name in ("train.py", "program.md") if not os.path.exists(os.path.join(args.dir, name))]
    if os.path.exists(os.path.join(args.dir, STATE_FILE)) and os.path.isdir(os.path.join(args.dir, ".git")):
        missing = []  # a workspace the loop has run in: resume restores its files from the best commit
    if missing:
        print(f"error: {args.dir} has no {' or '.join(missing)}: is it a workspace? "
              f"Create one with `memact research init {args.dir}`", file=sys.stderr)
        return 2
    config = RunConfig(
        budget_s=args.budget, experiments=args.experiments, proposer=args.proposer, memory=args.memory,
        baseline_runs=args.baseline_runs, context_budget=args.context_budget, seed=args.seed,
    )
    try:
        memory = make_memory_policy(args.memory, args.experiments)
        loop = ResearchLoop(args.dir, config, make_proposer(args.proposer, args.seed), memory)
    except (ValueError, PolicyUnavailable, ResearchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return loop.run()


def cmd_histories(args: argparse.Namespace) -> int:
    from memact.research.histories import write_histories

    if args.runs < 1 or args.experiments < 1:
        print(f"error: --runs and --experiments must be >= 1, got {args.runs} and {args.experiments}", file=sys.stderr)
        return 2
    runs = write_histories(args.out, args.runs, args.experiments, args.seed)
    statuses = [e["status"] for r in runs for e in r["experiments"]]
    print(f"{args.out}: {len(runs)} runs x {args.experiments} experiments "
          f"({statuses.count('keep')} keep, {statuses.count('discard')} discard, {statuses.count('crash')} crash)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from memact.research.plots import write_plots

    try:
        paths = write_plots(args.dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m memact.research.cli SUBCOMMAND ...`: the research commands alone.

    Same arguments as `memact research ...`, without importing the rest of memact's CLI
    (whose model commands load torch at start-up).
    """
    parser = argparse.ArgumentParser(prog="memact")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["research", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

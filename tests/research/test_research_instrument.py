"""The instrument for research memories: the surrogate template (fast, with crashes and noise)
and the proposer that knows only its context (it never repeats what it can see, and repeats
what a memory hid from it)."""

import importlib.util
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from memact.env.history import move_key, read_context
from memact.research.measure import measure_workspace
from memact.research.proposers import ContextProposer
from memact.research.workspace import init_workspace, template_dir


def surrogate_prepare():
    spec = importlib.util.spec_from_file_location("surrogate_prepare", f"{template_dir('surrogate')}/prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEFAULTS = dict(LEARNING_RATE=1e-3, WIDTH=96, DEPTH=2, N_HEADS=4, BATCH_SIZE=16, WARMUP_STEPS=30, WEIGHT_DECAY=0.1)


def test_surrogate_crashes_noise_and_an_optimum_far_from_the_defaults():
    prepare = surrogate_prepare()
    a, _ = prepare.evaluate(DEFAULTS, "run-a")
    assert a == prepare.evaluate(DEFAULTS, "run-a")[0] != prepare.evaluate(DEFAULTS, "run-b")[0]  # noise per run
    spread = [prepare.evaluate(DEFAULTS, f"r{i}")[0] for i in range(200)]
    sd = (sum((x - sum(spread) / 200) ** 2 for x in spread) / 199) ** 0.5
    assert 0.5 * prepare.NOISE_SD < sd < 1.5 * prepare.NOISE_SD
    best = dict(DEFAULTS, WIDTH=192, DEPTH=3, BATCH_SIZE=6, WARMUP_STEPS=20, LEARNING_RATE=prepare.best_lr(192, 6))
    assert prepare.evaluate(best, "x")[0] < a - 0.3  # much to find
    assert prepare.best_lr(384, 16) < prepare.best_lr(96, 16) < prepare.best_lr(96, 64)  # interactions
    for bad, why in ((dict(DEFAULTS, LEARNING_RATE=0.05), "loss is nan"), (dict(DEFAULTS, WIDTH=1024, DEPTH=8), "out of memory"),
                     (dict(DEFAULTS, WIDTH=98), "not a multiple of N_HEADS")):
        value, reason = prepare.evaluate(bad, "x")
        assert value is None and why in reason


def test_surrogate_train_py_prints_the_summary_or_crashes(tmp_path):
    init_workspace(str(tmp_path / "ws"), "surrogate")
    ok = subprocess.run([sys.executable, "train.py"], cwd=tmp_path / "ws", capture_output=True, text=True,
                        env={"MEMACT_RUN_ID": "t", "PATH": ""}, timeout=30)
    assert ok.returncode == 0 and "---\nval_bpb: " in ok.stdout
    src = (tmp_path / "ws" / "train.py").read_text().replace("LEARNING_RATE = 1e-3", "LEARNING_RATE = 0.05")
    (tmp_path / "ws" / "train.py").write_text(src)
    bad = subprocess.run([sys.executable, "train.py"], cwd=tmp_path / "ws", capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "loss is nan" in bad.stderr


BEST = open(f"{template_dir('surrogate')}/train.py").read()


def _record(i, status, description):
    return f"[r{i}] exp {i} {status} val_bpb=1.9 | {description} | constants x"


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_the_proposer_never_repeats_a_change_it_can_see_was_tried(data):
    proposer = ContextProposer(seed=data.draw(st.integers(0, 10)))
    moves = [f"{n} {v} -> {w}" for n, v, w in move_key_all(proposer)]
    shown = data.draw(st.lists(st.sampled_from(moves), unique=True, max_size=len(moves) - 1))
    statuses = data.draw(st.lists(st.sampled_from(["discard", "crash"]), min_size=len(shown), max_size=len(shown)))
    context = "\n".join(_record(i, s, d) for i, (s, d) in enumerate(zip(statuses, shown), 1))
    proposal = proposer.propose(context, BEST, data.draw(st.integers(1, 500)))
    assert move_key(proposal.description) not in {move_key(d) for d in shown}


def move_key_all(proposer):
    from memact.research.proposers import HEADS_NAME, find_constants, format_value

    constants = {n: c[3] for n, c in find_constants(BEST).items()}
    return [(n, format_value(constants[n]), format_value(v))
            for n, v, _ in proposer.candidates(constants, int(constants[HEADS_NAME]))]


def test_the_proposer_follows_what_helped_and_stays_clear_of_crashes():
    seen = read_context("\n".join([_record(1, "keep", "LEARNING_RATE 0.001 -> 0.0016"),
                                   _record(2, "crash", "WIDTH 96 -> 240")]))
    assert seen.helped == [("LEARNING_RATE", 1)] and seen.crashed == {("WIDTH", 1): 240.0}
    context = "\n".join([_record(1, "keep", "LEARNING_RATE 0.001 -> 0.0016"), _record(2, "crash", "WIDTH 96 -> 240")])
    ups = [ContextProposer(seed=0, follow=1.0).propose(context, BEST, e).description for e in range(1, 20)]
    assert all(d.startswith("LEARNING_RATE 0.001 -> 0.00125") for d in ups)  # the smallest step on
    spread = {ContextProposer(seed=0, follow=0.0).propose(context, BEST, e).description for e in range(1, 60)}
    assert not any(d.startswith("WIDTH 96 -> 240") for d in spread) and len(spread) > 10
    note = "[n1] note: exps 1-9 (9 runs: 2 keep, 7 discard); kept/tried: BATCH_SIZE 2/3, DEPTH 0/4; kept: exp 3 BATCH_SIZE 16 -> 10"
    seen = read_context(note)
    assert seen.kept_tried == {"BATCH_SIZE": (2, 3), "DEPTH": (0, 4)} and seen.helped == [("BATCH_SIZE", -1)]


def _run(ws, memory, budget, n=80):
    init_workspace(str(ws), "surrogate")
    subprocess.run([sys.executable, "-m", "memact.cli", "research", "run", str(ws), "--budget", "1", "--experiments",
                    str(n), "--proposer", "context", "--memory", memory, "--context-budget", str(budget), "--seed", "1"],
                   check=True, capture_output=True, timeout=600)
    return measure_workspace(ws, 1.6)


def test_the_instrument_can_fail_a_memory_that_hides_the_history(tmp_path):
    """With the whole history in view the proposer never runs the same configuration twice; a
    window of the same budget hides what it tried, and it does."""
    full = _run(tmp_path / "none", "none", 400)
    window = _run(tmp_path / "window", "window", 400)
    assert full["repeats"] == 0 and full["context_max"] > 400
    assert window["repeats"] > 0 and window["context_max"] <= 400
    assert full["prunes"] == 0 and window["prunes"] > 20 and window["fallbacks"] == 0
    assert full["best"] < 1.65 and full["experiments"] == window["experiments"] == 80


def test_measure_counts_the_memory_s_prunes_and_the_fallback_s(tmp_path):
    rows = ["commit\tval_bpb\tmemory_gb\tstatus\tdescription", "a\t1.7\t0.1\tkeep\tbaseline run 1/2",
            "b\t1.6\t0.1\tkeep\tLR 1 -> 2", "c\t1.65\t0.1\tdiscard\tLR 2 -> 4", "d\t0\t0\tcrash\tLR 2 -> 8"]
    (tmp_path / "results.tsv").write_text("\n".join(rows) + "\n")
    actions = ["-", "policy: deleted 2 records, note ab",
               "policy error (the policy read on at 411 tokens, over the budget); fallback heuristic: folded 3 records "
               "into cd", "policy: deleted 3 records, note ef; still over budget: fallback heuristic: nothing worth folding"]
    (tmp_path / "context.tsv").write_text("experiment\tcontext_tokens\tunpruned_tokens\tmemory_action\n" + "".join(
        f"{i}\t{300 + i}\t{300 + 9 * i}\t{a}\n" for i, a in enumerate(actions)))
    got = measure_workspace(tmp_path, 1.62)
    assert (got["prunes"], got["fallbacks"]) == (3, 1)
    assert got["experiments"] == 3 and got["best"] == 1.6 and got["reached"] == 1 and got["crashes"] == 1


def test_the_same_seed_draws_the_same_noise_in_every_workspace(tmp_path):
    """The surrogate's noise follows the run's seed and label (MEMACT_RUN_KEY), not the run's unique
    id: two workspaces of one seed log the same values, so memories compare paired."""
    import csv

    def values(ws):
        with open(ws / "results.tsv", newline="") as f:
            return [r["val_bpb"] for r in csv.DictReader(f, delimiter="\t")]

    a, b = _run(tmp_path / "a", "heuristic", 400, n=12), _run(tmp_path / "b", "heuristic", 400, n=12)
    assert a == b and values(tmp_path / "a") == values(tmp_path / "b")
    baseline = values(tmp_path / "a")[:3]
    assert len(set(baseline)) == 3  # the baseline's repeats still draw noise of their own

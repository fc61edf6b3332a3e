"""History tasks (memact.env.history): the reward on constructed good and bad notes, the files,
and episodes of the scripted history expert against the no-memory baselines."""

import json
import statistics

import pytest

from memact.env.history import (
    Experiment,
    HistoryFileError,
    HistoryTask,
    context_worth,
    load_histories,
    read_context,
    truth_after,
)
from memact.env.sources import parse_source

BASE = {"LEARNING_RATE": "0.001", "WIDTH": "96"}
EXPS = [
    Experiment(1, "keep", 1.9, "LEARNING_RATE 0.001 -> 0.0016", "constants LEARNING_RATE"),
    Experiment(2, "discard", 1.95, "WIDTH 96 -> 120", "constants WIDTH"),
    Experiment(3, "discard", 1.92, "LEARNING_RATE 0.001 -> 0.0025", "constants LEARNING_RATE"),  # from the old best
    Experiment(4, "crash", None, "WIDTH 96 -> 240", "constants WIDTH"),
]


def test_reader_sees_every_compact_line_of_a_note():
    note = "note: " + " ".join(e.compact() for e in EXPS)
    seen = read_context(note)
    assert len(seen.tried) == 4 and ("LEARNING_RATE", 1) in seen.helped and ("WIDTH", 1) in seen.crashed


def test_worth_of_good_and_bad_notes():
    truth = truth_after(BASE, EXPS)
    # exps 1 and 3 moved LEARNING_RATE from 0.001, no longer the best's value: not needed again.
    assert len(truth.tried) == 2 and truth.crashed == {("WIDTH", 1)} and truth.helped == {("LEARNING_RATE", 1)}
    full = "\n".join(e.line() for e in EXPS)
    assert context_worth(full, truth)["worth"] == 1.0
    good = "note: " + " ".join(EXPS[i].compact() for i in (0, 1, 3))  # drops only what is not needed
    assert context_worth(good, truth)["worth"] == 1.0
    bad = "note: " + EXPS[2].compact()  # keeps only the change made from an older best
    parts = context_worth(bad, truth)
    assert parts["tried"] == 0.0 and parts["crashed"] == 0.0 and parts["helped"] == 0.0
    assert context_worth("note: 4 experiments, one crash", truth)["worth"] == 0.0
    window = EXPS[3].line()  # the last record alone
    assert 0.0 < context_worth(window, truth)["worth"] < 1.0


def _write(tmp_path, rows):
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_history_file_errors_name_the_line_and_field(tmp_path):
    good = {"id": "r0", "baseline": BASE, "experiments": [
        {"experiment": 1, "status": "keep", "val_bpb": 1.9, "description": "WIDTH 96 -> 120"}]}
    assert load_histories(_write(tmp_path, [good]))[0]["experiments"][0].status == "keep"
    bad = dict(good, experiments=[{"experiment": 1, "status": "crash", "val_bpb": 1.9, "description": "x"}])
    with pytest.raises(HistoryFileError, match=r"line 2: experiments\[0\]: val_bpb must be null"):
        load_histories(_write(tmp_path, [good, bad]))
    with pytest.raises(HistoryFileError, match="line 1: 'baseline'"):
        load_histories(_write(tmp_path, [dict(good, baseline={"WIDTH": 96})]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_histories(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def history_file(tmp_path_factory):
    from memact.research.histories import write_histories

    path = tmp_path_factory.mktemp("hist") / "h.jsonl"
    runs = write_histories(path, runs=12, experiments=40, seed=0)
    assert runs == write_histories(path, runs=12, experiments=40, seed=0)  # deterministic
    return path


def test_source_splits_runs_and_replays_windows(history_file):
    src = parse_source(f"history:{history_file}")
    train, held = src.histories("train"), src.histories("eval")
    assert train and held and not {r["id"] for r in train} & {r["id"] for r in held}
    tasks = src.tasks(6, 2, seed=3, split="eval")
    assert all(isinstance(t, HistoryTask) and len(t.experiments) == 8 and t.k == 2 for t in tasks)
    assert all(t.task_id.split("-", 4)[-1].split("@")[0] in {r["id"] for r in held} for t in tasks)


def test_expert_beats_window_and_full_history_under_the_budget(history_file):
    """The instrument can fail: without a memory the whole history breaks the budget, a window
    forgets; the expert's notes keep most of what the proposer needs."""
    from transformers import AutoTokenizer

    from memact.agent.chat import ChatRenderer
    from memact.agent.loop import run_episodes
    from memact.agent.scripted import scripted_expert
    from memact.assets import tiny_warm
    from memact.engines.base import SamplingParams
    from memact.engines.scripted import ScriptedEngine
    from memact.env.memory import Budget

    tok = AutoTokenizer.from_pretrained(tiny_warm())
    tasks = parse_source(f"history:{history_file}").tasks(6, 4, seed=1, split="all")
    rewards = {}
    for spec, strategy in [("scripted", "memact"), ("scripted-nomem", "full"), ("scripted-nomem", "sliding_window:4")]:
        engine = ScriptedEngine(scripted_expert(spec, tasks), tok)
        trajs = run_episodes(engine, tasks, ChatRenderer(tok), SamplingParams(max_new_tokens=512), Budget(2048, 80),
                             strategy, seed=0, progress=False)
        rewards[strategy] = statistics.mean(t.reward for t in trajs)
        if strategy == "memact":
            assert all(t.metrics["memory_actions"] >= 3 and not t.metrics["overflow"] for t in trajs)
    print(f"\n[history K=4] mean reward: {rewards}")
    assert rewards["full"] < 0.5  # 16 whole experiment records mostly break 2048 tokens
    assert rewards["memact"] > rewards["sliding_window:4"] + 0.1 > rewards["full"]


def test_a_mix_interleaves_qa_and_history_tasks_and_a_train_config_takes_them(history_file):
    from memact.dcpo.config import ConfigError, load_config

    mix = parse_source(f"mix:synthetic+history:{history_file}")
    tasks = mix.tasks(5, 2, seed=3, split="train")
    assert [type(t).__name__ for t in tasks] == ["Task", "HistoryTask", "Task", "HistoryTask", "Task"]
    assert [t.task_id for t in tasks] == [t.task_id for t in mix.tasks(5, 2, seed=3, split="train")]
    held = {t.task_id.rsplit("-", 1)[-1] for t in mix.tasks(40, 2, seed=3, split="eval") if isinstance(t, HistoryTask)}
    assert held and not held & {t.task_id.rsplit("-", 1)[-1] for t in tasks if isinstance(t, HistoryTask)}
    for spec in (f"history:{history_file}", mix.spec):  # the trainer's config check reads history files too
        assert load_config(None, [f"rollout.tasks={spec}", "rollout.objectives=2"]).rollout.tasks == spec
    held_run = parse_source(f"history:{history_file}").histories("eval")[0]["id"]
    only_eval = history_file.parent / "held.jsonl"
    only_eval.write_text(next(line for line in history_file.read_text().splitlines() if held_run in line) + "\n")
    with pytest.raises(ConfigError, match="no runs in the train split"):
        load_config(None, [f"rollout.tasks=mix:synthetic+history:{only_eval}"])

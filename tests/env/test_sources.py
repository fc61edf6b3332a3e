"""Task sources (`memact.env.sources`): data files for every command, their splits and errors, and
the long-document variant of the synthetic task."""

import json

import pytest
from data_helpers import hotpot_rows, qa_rows, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from memact.agent.rollout import rollout
from memact.cli import main
from memact.env.memory import Budget
from memact.env.sources import (
    LONG_DOC_WORDS,
    DataError,
    build_corpus,
    load_rows,
    parse_source,
    split_of,
)
from memact.env.task import make_task


def test_hotpotqa_json_jsonl_and_parquet_give_the_same_rows(tmp_path):
    rows = hotpot_rows(6)
    (tmp_path / "h.json").write_text(json.dumps(rows))
    loaded = load_rows("hotpotqa", tmp_path / "h.json")
    assert [r.id for r in loaded] == [f"id{i}" for i in range(6)]
    assert loaded[0].supporting == ("Town0", "River0")
    corpus = build_corpus(loaded)
    assert len(corpus) == 12 and corpus[0] == "Town0: Town0 lies on the river Blue0. It has a mill."
    assert load_rows("hotpotqa", write_jsonl(tmp_path / "h.jsonl", rows)) == loaded
    import pandas as pd

    hf_rows = [{**r, "context": {"title": [c[0] for c in r["context"]], "sentences": [c[1] for c in r["context"]]},
                "supporting_facts": {"title": [s[0] for s in r["supporting_facts"]],
                                     "sent_id": [s[1] for s in r["supporting_facts"]]}} for r in rows]
    pd.DataFrame(hf_rows).to_parquet(tmp_path / "h.parquet")
    assert load_rows("hotpotqa", tmp_path / "h.parquet") == loaded


def test_qa_format_rows_and_tasks(tmp_path):
    source = parse_source(f"qa:{write_jsonl(tmp_path / 'qa.jsonl', qa_rows())}")
    rows = source.questions("all")
    assert rows[3].aliases == ("M3",) and rows[3].documents[0] == ("Ardel3", "The tower of Ardel3 was built by Mason3.")
    tasks = source.tasks(5, 3, seed=1, split="train")
    assert all(t.k == 3 and t.documents is tasks[0].documents and t.source == "qa" for t in tasks)
    assert tasks == source.tasks(5, 3, seed=1, split="train")  # seeded
    assert tasks[0].questions[0].query == tasks[0].questions[0].supporting[0]  # the expert searches the title


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60, unique=True))
def test_splits_partition_the_questions_and_never_depend_on_order(ids):
    train = {i for i in ids if split_of(i) == "train"}
    evals = {i for i in ids if split_of(i) == "eval"}
    assert not train & evals and train | evals == set(ids)
    assert {i for i in reversed(ids) if split_of(i) == "eval"} == evals


def test_train_and_eval_tasks_never_share_a_question(tmp_path):
    source = parse_source(f"hotpotqa:{write_jsonl(tmp_path / 'h.jsonl', hotpot_rows(200))}")
    n_eval = len(source.questions("eval"))
    assert 20 <= n_eval <= 60 and n_eval + len(source.questions("train")) == 200
    asked = {split: {q.text for t in source.tasks(50, 4, seed=s, split=split) for q in t.questions}
             for split, s in (("train", 0), ("eval", 1000))}
    assert asked["train"] and asked["eval"] and not asked["train"] & asked["eval"]


BAD = [
    ({"question": "q", "answer": "a", "documents": [{"title": "t", "text": "x"}]}, "row 1: field 'id' is missing"),
    ({"id": "z", "question": "q", "answer": "", "documents": [{"title": "t", "text": "x"}]},
     "row 1 \\(id 'z'\\): field 'answer' is empty"),
    ({"id": "z", "question": ["q"], "answer": "a", "documents": [{"title": "t", "text": "x"}]},
     "row 1 \\(id 'z'\\): field 'question' must be a string, got list"),
    ({"id": "z", "question": "q", "answer": "a", "documents": []}, "row 1 \\(id 'z'\\): field 'documents'"),
    ({"id": "z", "question": "q", "answer": "a", "documents": [{"title": "t"}]},
     "row 1 \\(id 'z'\\): documents\\[0\\]: field 'text' is missing"),
    ({"id": "z", "question": "q", "answer": "a", "aliases": "b", "documents": [{"title": "t", "text": "x"}]},
     "field 'aliases' must be a list of strings"),
    ({"id": "z", "question": "q", "answer": "a", "anwser": "b", "documents": [{"title": "t", "text": "x"}]},
     "unknown field\\(s\\) 'anwser'"),
    ({"id": "q0", "question": "q", "answer": "a", "documents": [{"title": "t", "text": "x"}]},
     "row 1: id 'q0' is also row 0's"),
    ("just a string", "row 1: a row must be an object, got str"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_a_bad_row_is_named_with_its_field_and_nothing_is_written(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(qa_rows(1)[0]) + "\n" + json.dumps(bad) + "\n" + json.dumps(qa_rows(3)[2]) + "\n")
    with pytest.raises(DataError, match=message):
        load_rows("qa", path)
    out = tmp_path / "traj.jsonl"
    with pytest.raises(SystemExit, match=message):
        main(["rollout", "--policy", "scripted", "--data", f"qa:{path}", "-k", "1", "--n", "1", "--out", str(out),
              "--quiet"])
    assert not out.exists()


def test_bad_lines_and_bad_hotpotqa_fields_are_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(qa_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_rows("qa", path)
    rows = hotpot_rows(3)
    del rows[1]["answer"]
    with pytest.raises(DataError, match="row 1 \\(_id 'id1'\\): field 'answer' is missing"):
        load_rows("hotpotqa", write_jsonl(tmp_path / "h.jsonl", rows))
    rows = hotpot_rows(3)
    rows[2]["context"] = [["Town2", "not a list"]]
    with pytest.raises(DataError, match="row 2 \\(_id 'id2'\\): bad field 'context'"):
        load_rows("hotpotqa", write_jsonl(tmp_path / "h2.jsonl", rows))


@pytest.mark.parametrize("spec,message", [
    ("squad:x", "expected synthetic \\| long"), ("long:0", "positive whole number"), ("long:ten", "positive"),
    ("qa:", "needs a file path"), ("hotpotqa:/no/such.json", "does not exist"),
    ("mix:synthetic", "two or more sources"), ("mix:synthetic+", "two or more"),
    ("mix:synthetic+mix:long+long", "not mixes"), ("mix:synthetic+qa:/no/such.jsonl", "does not exist"),
])
def test_bad_source_specs(spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        parse_source(spec)


def test_long_documents_keep_the_world_and_fill_the_context():
    short, long = make_task(5, 2), make_task(5, 2, doc_words=LONG_DOC_WORDS)
    assert [q.text for q in long.questions] == [q.text for q in short.questions]
    assert [q.answer for q in long.questions] == [q.answer for q in short.questions]
    assert all(LONG_DOC_WORDS <= len(d.split()) < LONG_DOC_WORDS + 12 for d in long.documents)
    assert all(a in b for a, b in zip(short.documents, long.documents))  # the short text is inside, whole
    assert parse_source("long").tasks(3, 2, 7)[0].documents == parse_source(f"long:{LONG_DOC_WORDS}").tasks(
        3, 2, 7)[0].documents
    # The scripted experts still solve it; without memory the context grows with every search.
    tasks = parse_source("long:100").tasks(4, 4, seed=3)
    mem = rollout("scripted", 4, 4, tasks=tasks, budget=Budget(20_000, 40), progress=False)
    nomem = rollout("scripted-nomem", 4, 4, tasks=tasks, budget=Budget(20_000, 40), progress=False)
    assert all(t.reward == 1.0 for t in mem + nomem)
    from memact.trajectory import trajectory_stats

    assert trajectory_stats(nomem)["context_peak_mean"] > 1.5 * trajectory_stats(mem)["context_peak_mean"]


def test_rollout_sft_train_and_eval_on_a_hotpotqa_file(tmp_path, micro_model_dir):
    """The must-show path: scripted trajectories from the file, SFT on them, two DCPO steps on the
    file's train split, and an evaluation on its eval split."""
    data = f"hotpotqa:{write_jsonl(tmp_path / 'hotpot.jsonl', hotpot_rows(60))}"
    traj = tmp_path / "traj.jsonl"
    assert main(["rollout", "--policy", "scripted", "--data", data, "-k", "2", "--n", "6", "--out", str(traj),
                 "--context-budget", "4000", "--quiet"]) == 0
    rows = [json.loads(line) for line in traj.read_text().splitlines()]
    assert len(rows) == 6 and all(r["reward"] == 1.0 for r in rows)
    sft_out = tmp_path / "sft"
    assert main(["sft", "--data", str(traj), "--out", str(sft_out), f"model.path={micro_model_dir}",
                 "sft.epochs=1", "batch.max_seq_len=1280", "logging.progress=false"]) == 0
    run = tmp_path / "rl"
    assert main(["train", "--out", str(run), f"model.path={micro_model_dir}", f"rollout.tasks={data}",
                 "rollout.objectives=2", "run.steps=2", "rollout.prompts_per_step=2", "rollout.n_traj=2",
                 "rollout.max_steps=2", "rollout.max_new_tokens=8", "batch.max_seq_len=1280",
                 "logging.progress=false", "logging.table_every=0", "run.keep_checkpoints=0"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    ev = tmp_path / "ev"
    assert main(["eval", "--policy", f"scripted,{run / 'checkpoints' / 'step_000002'}", "--data", data,
                 "--objectives", "2", "--n", "3", "--context-budget", "4000", "--out", str(ev), "--quiet"]) == 0
    episodes = [json.loads(line) for line in (ev / "episodes.jsonl").read_text().splitlines()]
    eval_questions = {q.question for q in parse_source(data).questions("eval")}
    assert {q["gold"] for e in episodes for q in e["questions"]} <= {q.answer for q in parse_source(
        data).questions("eval")}
    assert eval_questions and all(e["task_id"].startswith("hotpotqa-eval") for e in episodes)


def test_train_config_names_a_bad_data_file_before_loading_weights(tmp_path):
    from memact.dcpo.config import ConfigError, load_config

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "q"}) + "\n")
    with pytest.raises(ConfigError, match="rollout.tasks=.*row 0 \\(id 'a'\\): field 'answer' is missing"):
        load_config(None, [f"rollout.tasks=qa:{path}"])
    small = write_jsonl(tmp_path / "small.jsonl", qa_rows(3))
    with pytest.raises(ConfigError, match="fewer than K=4"):
        load_config(None, [f"rollout.tasks=qa:{small}", "rollout.objectives=4"])

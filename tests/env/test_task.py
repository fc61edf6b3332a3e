"""The synthetic multi-objective QA task: seeds, retrieval, answers and rewards."""

from memact.env.task import (
    PENALTY,
    make_task,
    make_tasks,
    normalize_answer,
    parse_final_answer,
    score_answer,
    world_vocabulary,
)
from memact.env.tools import BM25Search


def test_seeded_tasks_are_reproducible():
    a, b = make_task(11, 4), make_task(11, 4)
    assert a == b
    assert make_task(12, 4) != a
    assert a.k == 4 and [q.key for q in a.questions] == ["Q1", "Q2", "Q3", "Q4"]


def test_search_ranks_the_fact_first():
    for task in make_tasks(20, 6, seed=3):
        search = BM25Search(task.documents)
        for q in task.questions:
            top = search(q.query, 1)
            assert task.find_answer(q.key, top[0]) == q.answer, (q.query, top)


def test_world_words_are_distinct():
    words = world_vocabulary()
    assert len({w.lower() for w in words}) == len(words)


def test_normalize_and_parse():
    assert normalize_answer("  The Teal! ") == "teal"
    assert parse_final_answer('FINAL_ANSWER: {"Q1": "owl", "Q2": "teal"}<|im_end|>') == {"Q1": "owl", "Q2": "teal"}
    assert parse_final_answer("FINAL_ANSWER: owl") is None
    assert parse_final_answer("no answer here") is None
    assert parse_final_answer('FINAL_ANSWER: ["owl"]') is None


def test_score_share_and_penalty():
    task = make_task(2, 4)
    gold = task.gold()
    assert score_answer(task, gold) == (1.0, [True] * 4)
    half = dict(gold, Q1="nope", Q3="nope")
    assert score_answer(task, half)[0] == 0.5
    shouted = {k: v.upper() + "." for k, v in gold.items()}
    assert score_answer(task, shouted)[0] == 1.0
    assert score_answer(task, None)[0] == PENALTY
    assert score_answer(task, {})[0] == 0.0

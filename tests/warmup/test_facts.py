"""The recall warm-up: episode generator, held-out split, curriculum, metric, and a tiny end-to-end run."""

import argparse
import json
import random
import re

import pytest
import torch

from memact.env.memory import ID_POOL
from memact.env.task import ATTRIBUTES, NAME_POOL
from memact.warmup.facts import (
    EpisodeBuilder,
    PretrainConfig,
    SequenceStream,
    answer_accuracy,
    parse_curriculum,
    split_names,
)

LEVELS = (2, 4, 8, 16)
FACT_RE = re.compile(r"The (\w+) of (\w+) is (\w+)\.")
VALUES = {v for vals in ATTRIBUTES.values() for v in vals}


@pytest.fixture(scope="module")
def builder(tokenizer):
    return EpisodeBuilder(tokenizer)


def test_recall_episode_answer_token_is_the_value(builder, tokenizer):
    train, _ = split_names(0.2)
    rng = random.Random(0)
    for n in LEVELS:
        for _ in range(5):
            ep = builder.recall(rng, n, train)
            facts = {(e, a): v for a, e, v in FACT_RE.findall(ep.text)}
            questions = re.findall(r"Q\d+: What is the (\w+) of (\w+)\?", ep.text)
            assert len(ep.targets) == len(questions) == min(n, builder.max_questions)
            assert ep.kinds == ["recall"] * len(questions)
            for pos, (attr, entity) in zip(ep.targets, questions):
                assert ep.ids[pos] == tokenizer.convert_tokens_to_ids(facts[entity, attr])
            # The text and the ids agree (one tokenization, answer positions found by offsets).
            assert tokenizer.decode(ep.ids) == ep.text


def test_curriculum_levels_give_the_stated_number_of_facts(builder):
    train, _ = split_names(0.2)
    rng = random.Random(1)
    for n in LEVELS:
        ep = builder.recall(rng, n, train)
        assert ep.n_facts == n
        assert len(set(FACT_RE.findall(ep.text))) == n  # every fact shown once, all distinct
        pr = builder.prune(rng, n, train)
        assert pr.n_facts == n
        assert pr.kinds.count("copy") == pr.kinds.count("note") == min(n, builder.max_records)


def test_prune_episode_copies_the_record_ids_and_notes_the_answers(builder, tokenizer):
    rng = random.Random(2)
    ep = builder.prune(rng, 4, NAME_POOL[:50])
    shown = re.findall(r"<tool_response>\n\[id: (\w+)\]", ep.text)
    copied = [tokenizer.convert_ids_to_tokens(ep.ids[p]) for p, k in zip(ep.targets, ep.kinds) if k == "copy"]
    assert copied == shown and all(c in ID_POOL for c in copied)
    notes = [tokenizer.convert_ids_to_tokens(ep.ids[p]) for p, k in zip(ep.targets, ep.kinds) if k == "note"]
    assert notes == re.findall(r"Q\d+: (\w+)", re.search(r'"memory": "([^"]*)"', ep.text).group(1))
    assert all(v in VALUES for v in notes)
    # Each noted answer is what its question's search record states.
    questions = re.findall(r"Q\d+: What is the (\w+) of (\w+)\?", ep.text)
    facts = {(e, a): v for a, e, v in FACT_RE.findall(ep.text)}
    assert notes == [facts[e, a] for a, e in questions]


def test_held_out_names_never_appear_in_training_rows(builder, tokenizer):
    train, held = split_names(0.2)
    assert len(held) == 64 and held == NAME_POOL[-64:] and not set(train) & set(held)
    held_ids = {tokenizer.convert_tokens_to_ids(n) for n in held}
    stream = SequenceStream(builder, 768, LEVELS, train, text_share=0.3, review=0.3, forbidden_ids=held_ids,
                            seed=3, text_bytes=40_000)
    kinds = set()
    for level in range(len(LEVELS)):
        for _ in range(12):
            row = stream.row(level)
            kinds.update(row.kinds)
            assert not held_ids & set(row.ids)
            assert not set(row.entities) & set(held)
    assert kinds == {"recall", "prune", "text"}


def test_rows_fit_seq_len_and_levels_pack_their_episodes(builder):
    train, _ = split_names(0.2)
    stream = SequenceStream(builder, 768, LEVELS, train, text_share=0.0, review=0.0, seed=4)
    for level, n in enumerate(LEVELS):
        length = stream.row_len(level)
        assert length <= 768 and length % 64 == 0
        for _ in range(6):
            row = stream.row(level)
            assert len(row.ids) == length and 0 < row.n_real <= length
            assert row.n_facts[0] == n and max(row.n_facts) == n  # later ones may be shorter tail fillers
            assert len(row.entities) == len(set(row.entities))  # no entity twice in a row
        ids, labels, n_real = stream.batch(level, 2 * 768)
        assert ids.shape[1] == length and ids.shape[0] == max(1, 2 * 768 // length)
        assert int((labels != -100).sum()) == n_real
    with pytest.raises(ValueError, match="seq_len 256 is too short"):
        SequenceStream(builder, 256, LEVELS, train)


class _Oracle(torch.nn.Module):
    """Logits whose maximum at position t is the token at t + shift (shift 1: always right)."""

    def __init__(self, vocab: int, shift: int):
        super().__init__()
        self.vocab, self.shift = vocab, shift

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -self.shift, dims=1)
        return argparse.Namespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_recall_metric_on_a_hand_built_case(builder, tokenizer):
    rng = random.Random(5)
    episodes = [builder.recall(rng, 4, NAME_POOL[:40]) for _ in range(3)] + [builder.prune(rng, 2, NAME_POOL[:40])]
    pad = tokenizer.pad_token_id
    assert answer_accuracy(_Oracle(len(tokenizer), 1), episodes, pad) == {"recall": 1.0, "note": 1.0, "copy": 1.0}
    # Predicting the current token instead of the next one is never right at an answer.
    assert answer_accuracy(_Oracle(len(tokenizer), 0), episodes, pad) == {"recall": 0.0, "note": 0.0, "copy": 0.0}


def test_config_errors_name_the_bad_input():
    with pytest.raises(ValueError, match="curriculum"):
        parse_curriculum("2,x")
    with pytest.raises(ValueError, match="increasing"):
        PretrainConfig(curriculum=(4, 2))
    with pytest.raises(ValueError, match="dtype"):
        PretrainConfig(dtype="fp16")
    with pytest.raises(ValueError, match="heldout_frac"):
        split_names(1.0)


def test_pretrain_end_to_end_writes_a_loadable_model(tiny_model_dir, tmp_path):
    from memact.models.model import load_policy
    from memact.warmup.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "warm"
    args = parser.parse_args([
        "pretrain", "--recipe", "facts", "--model", str(tiny_model_dir), "--out", str(out), "--tokens", "1500", "--batch", "1",
        "--seq-len", "512", "--curriculum", "2,4", "--eval-every", "2", "--eval-targets", "8",
        "--text-share", "0", "--dtype", "fp32",
    ])
    assert args.func(args) == 0
    rows = [json.loads(line) for line in (out / "recall_curve.jsonl").read_text().splitlines()]
    assert rows[0]["tokens"] == 0 and rows[-1]["tokens"] >= 1500
    assert set(rows[-1]["recall"]) == {"2", "4"} and all(0.0 <= v <= 1.0 for v in rows[-1]["recall"].values())
    assert {"step", "loss", "recall", "copy", "chance"} <= set(rows[-1])
    assert (out / "recall_curve.png").stat().st_size > 0
    before, tok = load_policy(tiny_model_dir)
    after, tok2 = load_policy(out)
    assert len(tok2) == len(tok)
    # Trained, except the held-out names' embeddings, which stay as initialised.
    held = [tok.convert_tokens_to_ids(n) for n in split_names(0.2)[1]]
    emb0, emb1 = before.get_input_embeddings().weight, after.get_input_embeddings().weight
    assert not torch.equal(emb0, emb1) and torch.equal(emb0[held], emb1[held])
    with pytest.raises(FileExistsError, match="not empty"):
        args.func(args)

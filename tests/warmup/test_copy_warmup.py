"""The copy warm-up: episode targets are what they claim, the recipe parses, a tiny run end to end."""

import argparse
import json
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memact.env.memory import ID_POOL
from memact.warmup.copy import (
    DEFAULT_STAGES,
    FRESH,
    KIND_NAMES,
    CopyWarmup,
    Stage,
    episode,
    make_batch,
    parse_stages,
    stages_text,
)

IDS = set(ID_POOL)


def _targets(tokenizer, ids, tgt, kind: str) -> list[str]:
    """The target words of one kind, in order."""
    return [tokenizer.convert_ids_to_tokens(i) for i, k in zip(ids, tgt) if KIND_NAMES.get(k) == kind]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), fmt=st.sampled_from(["mqar", "mqar_all"]))
def test_mqar_target_is_the_value_that_followed_the_same_key(tokenizer, seed, n, fmt):
    ids, tgt = episode(fmt, n, random.Random(seed), tokenizer)
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert len(ids) == len(tgt) == 4 * n and sum(tgt) == n
    first = dict(zip(ids[0:2 * n:2], ids[1:2 * n:2]))
    assert len(first) == n  # distinct keys
    for p, kind in enumerate(tgt):
        if kind:
            assert KIND_NAMES[kind] == "recall" and p >= 2 * n and ids[p] == first[ids[p - 1]]


def test_batch_packs_whole_episodes_and_rejects_a_row_too_short(tokenizer):
    x, m, k = make_batch("mqar", 4, random.Random(0), tokenizer, rows=3, seq=128)
    assert x.shape == m.shape == k.shape == (3, 128)
    assert (k[m == 0] == 0).all() and int((k > 0).sum()) % 4 == 0
    with pytest.raises(ValueError, match="shorter than one idlist episode"):
        make_batch("idlist", 3, random.Random(0), tokenizer, rows=1, seq=16)
    with pytest.raises(ValueError, match="unknown episode format 'prune'"):
        episode("prune", 3, random.Random(0), tokenizer)


def test_parse_stages_defaults_scale_and_errors():
    assert parse_stages(stages_text(DEFAULT_STAGES)) == DEFAULT_STAGES
    st_ = parse_stages("mqar:1000,idlist_mqar:200:2:2:384", scale=0.5, lr=3e-4)
    assert st_ == (Stage("mqar", 500, 4, 4, 128, 3e-4), Stage("idlist_mqar", 100, 2, 2, 384, 3e-4))
    assert parse_stages("mqar:10", scale=0.001)[0].steps == 1
    assert parse_stages("idlist:7:1:4:128:targets") == (Stage("idlist", 7, 1, 4, 128, loss="targets"),)
    assert parse_stages("idlist:7") == parse_stages("idlist:7:1:4:128:targets")  # idlist's own defaults
    for bad, msg in [("bogus:10", "not one of"), ("mqar", "format:steps"), ("mqar:x", "integers"),
                     ("mqar:0", "steps must be >= 1"), ("", "names no stage"),
                     ("idlist:7:1:4:128:some", "loss must be one of all, targets, copy")]:
        with pytest.raises(ValueError, match=msg):
            parse_stages(bad)


def test_lr_warms_up_then_decays_to_a_tenth():
    s = Stage("mqar", 1000, lr=1e-3)
    assert CopyWarmup.lr_at(s, 0) == pytest.approx(1e-5)
    lrs = [CopyWarmup.lr_at(s, i) for i in range(1001)]
    assert max(lrs) == lrs[99] > 0.97e-3  # the cosine already runs under the warm-up, as measured
    assert all(a < b for a, b in zip(lrs[:99], lrs[1:100])) and all(a >= b for a, b in zip(lrs[99:], lrs[100:]))
    assert CopyWarmup.lr_at(s, 1000) == pytest.approx(1e-4)


def test_copy_recipe_end_to_end_writes_a_loadable_model_and_its_curve(micro_model_dir, tmp_path):
    from memact.models.model import load_policy
    from memact.warmup.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "warm"
    args = parser.parse_args(["pretrain", "--model", str(micro_model_dir), "--out", str(out),
                              "--stages", "mqar:3,idlist_mqar:2:2:1:512:copy", "--eval-every", "2"])
    assert args.func(args) == 0
    rows = [json.loads(line) for line in (out / "recall_curve.jsonl").read_text().splitlines()]
    # Stage 1 evaluates at its start, step 2 and its end; stage 2 at step 5 (its end), then the
    # saved model once more, after the redraw.
    assert [(r["stage"], r["step"]) for r in rows] == [(0, 0), (0, 2), (0, 3), (1, 5), (1, 5)]
    assert [r.get("after_redraw", False) for r in rows] == [False] * 4 + [True]
    assert {"mqar/recall", "idlist_mqar/copy", "idlist_mqar/recall"} <= set(rows[-1]["acc"])
    assert all(0.0 <= v <= 1.0 for v in rows[-1]["acc"].values()) and rows[-1]["tokens"] > rows[2]["tokens"]
    assert (out / "recall_curve.png").stat().st_size > 0
    assert json.loads((out / "pretrain_config.json").read_text())["stages"][1]["seq_len"] == 512
    before, _ = load_policy(micro_model_dir)
    after, _ = load_policy(out)
    assert not torch.equal(before.get_input_embeddings().weight, after.get_input_embeddings().weight)
    with pytest.raises(FileExistsError, match="not empty"):
        args.func(args)


def test_pretrain_refuses_bad_flags_before_anything_is_written(micro_model_dir, tmp_path):
    from memact.warmup.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    for argv, message in [(["--device", "tpu"], "use auto, cpu, cuda"), (["--stages", "prune:10"], "not one of"),
                          (["--eval-every", "0"], "--eval-every must be >= 1")]:
        args = parser.parse_args(["pretrain", "--model", str(micro_model_dir), "--out", str(tmp_path / "w"), *argv])
        with pytest.raises(SystemExit, match=message):
            args.func(args)
    with pytest.raises(SystemExit):  # the retired facts recipe's flags are gone
        parser.parse_args(["pretrain", "--model", "m", "--out", "o", "--recipe", "facts"])
    assert not list(tmp_path.iterdir())


def test_idlist_episode_is_the_one_measured(tokenizer):
    """Pinned to the output of the code the recipe was measured with (commit ae484fb)."""
    ids, tgt = episode("idlist", 2, random.Random(7), tokenizer)
    assert tokenizer.decode(ids) == ('[id: v9x85rdi]\nGeva Krioraes\n[id: r2un6esw]\nLukaeth Siothil Sadaex Zovon\n'
                                     '[id: j5k23auu]\nViren Laedis\n"delete_ids": ["r2un6esw", "j5k23auu"]')
    assert tgt == [FRESH] * 43 + [3, 0, 0, 3, 0]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4))
def test_idlist_targets_are_every_record_id_but_the_head_in_order(tokenizer, seed, n):
    ids, tgt = episode("idlist", n, random.Random(seed), tokenizer)
    text = tokenizer.decode(ids)
    headers = re.findall(r"\[id: (\w+)\]", text)
    copies = _targets(tokenizer, ids, tgt, "copy")
    assert set(tgt) <= {FRESH, 0, 3} and copies == headers[1:] and 1 <= len(copies) <= n
    # Everything before the first copied id (the fresh headers) is FRESH, nothing after it.
    first = tgt.index(3)
    assert set(tgt[:first]) == {FRESH} and FRESH not in tgt[first:]
    assert "delete_ids" not in tokenizer.decode(ids[first:])
    # The filler words hold no record id: the only ids in context are the headers.
    assert sum(tokenizer.convert_ids_to_tokens(i) in IDS for i in ids) == len(headers) + len(copies)


def test_copy_loss_skips_only_the_fresh_headers(tokenizer):
    x, m, kind = make_batch("idlist_mqar", 1, random.Random(3), tokenizer, 8, 128)
    assert (kind == FRESH).any() and (kind == 1).any() and (kind == 3).any()  # both episode kinds present
    assert ((kind == FRESH) <= (m == 1)).all()  # padding is never marked


def test_redraw_rows_gives_distinct_rows_of_the_typical_norm_and_leaves_the_rest(micro_model_dir):
    from memact.models.model import load_policy
    from memact.warmup.embeddings import redraw_rows

    model, _ = load_policy(micro_model_dir)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():  # collapse 40 rows onto one vector, as the warm-up leaves them
        emb[10:50] = emb[5] * 3
    before = emb.detach().clone()
    stats = redraw_rows(model, list(range(10, 50)) + [10], seed=3)
    after = emb.detach()
    assert stats["rows"] == 40 and stats["cos_before"] == pytest.approx(1.0, abs=1e-4)
    keep = torch.ones(len(before), dtype=torch.bool)
    keep[10:50] = False
    assert torch.equal(after[keep], before[keep])
    norms = after[10:50].norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, before[keep].norm(dim=1).median().item()), rtol=1e-4)
    unit = torch.nn.functional.normalize(after[10:50], dim=1)
    assert (unit @ unit.T - torch.eye(40)).abs().max() < 0.9  # no longer one vector
    if model.config.tie_word_embeddings:
        assert torch.equal(model.get_output_embeddings().weight[10:50], after[10:50])
    again, _ = load_policy(micro_model_dir)
    with torch.no_grad():
        again.get_input_embeddings().weight[10:50] = again.get_input_embeddings().weight[5] * 3
    redraw_rows(again, range(10, 50), seed=3)
    assert torch.equal(again.get_input_embeddings().weight, after)  # seeded
    assert redraw_rows(again, []) == {"rows": 0, "cos_before": None, "norm": None}


def test_copy_recipe_redraws_exactly_the_rows_it_never_fed(micro_model_dir, tmp_path):
    from memact.models.model import load_policy
    from memact.warmup.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    outs = {}
    for name, extra in (("redrawn", []), ("kept", ["--keep-unseen-rows"])):
        outs[name] = tmp_path / name
        args = parser.parse_args(["pretrain", "--model", str(micro_model_dir), "--out", str(outs[name]),
                                  "--stages", "mqar:2", "--eval-every", "2", *extra])
        assert args.func(args) == 0
    redrawn = load_policy(outs["redrawn"])[0].get_input_embeddings().weight.detach()
    kept, tokenizer = load_policy(outs["kept"])
    kept = kept.get_input_embeddings().weight.detach()
    changed = (redrawn != kept).any(dim=1)
    # What the two mqar steps fed (same seed, same batches): names, values, EOS.
    model, _ = load_policy(micro_model_dir)
    warm = CopyWarmup(model, tokenizer, (Stage("mqar", 2),), seed=0, log=lambda s: None)
    warm.run()
    fed = warm.seen
    assert fed.sum() > 0 and torch.equal(changed, ~fed)
    stats = json.loads((outs["redrawn"] / "pretrain_config.json").read_text())["redraw_unseen"]
    assert stats["rows"] == int((~fed).sum())
    assert json.loads((outs["kept"] / "pretrain_config.json").read_text())["redraw_unseen"] is False

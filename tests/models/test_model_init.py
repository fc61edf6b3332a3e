"""Type directions at initialisation: every record id shares one embedding direction."""

import pytest
import torch

from memact.models.model import ModelPreset, add_type_directions, build_model, world_token_groups

MICRO = ModelPreset(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _mean_cosine(rows: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(rows, dim=1)
    sim = unit @ unit.T
    n = len(rows)
    return float((sim.sum() - n) / (n * (n - 1)))


def test_ids_share_a_direction_and_other_rows_do_not_move(tokenizer):
    model = build_model(MICRO, vocab_size=len(tokenizer), seed=0)
    before = model.get_input_embeddings().weight.detach().clone()
    groups = world_token_groups(tokenizer, ("id", "name"))
    assert len(groups["id"]) == 512 and len(set(groups["id"]) & set(groups["name"])) == 0
    add_type_directions(model, groups, seed=0)
    after = model.get_input_embeddings().weight.detach()
    ids, names = groups["id"], groups["name"]
    # Independent random rows have mean cosine ~0; a shared direction of the rows' own norm gives ~0.5.
    assert abs(_mean_cosine(before[ids])) < 0.05 and _mean_cosine(after[ids]) > 0.4
    assert _mean_cosine(after[names]) > 0.4
    # ids and names get different directions.
    assert abs(float(torch.nn.functional.cosine_similarity(
        (after[ids] - before[ids]).mean(0), (after[names] - before[names]).mean(0), dim=0))) < 0.5
    others = sorted(set(range(len(tokenizer))) - set(ids) - set(names))
    assert torch.equal(before[others], after[others])
    # Tied: the output embedding is the same tensor.
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_unknown_group_and_a_tokenizer_without_world_tokens_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown word groups"):
        world_token_groups(tokenizer, ("ids",))
    from memact.models.tokenizer import task_corpus, train_tokenizer

    plain = train_tokenizer(task_corpus(n_tasks=5), vocab_size=300, world_tokens=False)
    with pytest.raises(ValueError, match="no single token for every id word"):
        world_token_groups(plain, ("id",))


def test_new_model_applies_the_id_direction(tiny_model_dir, tokenizer):
    from memact.models.model import load_policy

    model, tok = load_policy(tiny_model_dir)
    ids = world_token_groups(tok, ("id",))["id"]
    assert _mean_cosine(model.get_input_embeddings().weight.detach()[ids]) > 0.4


def test_new_model_cli_refuses_an_unknown_type_group(tmp_path):
    from memact.cli import main

    with pytest.raises(SystemExit, match="unknown group"):
        main(["new-model", "--out", str(tmp_path / "m"), "--type-groups", "id,ids"])
    assert not (tmp_path / "m").exists()


def test_resolve_device_is_checked():
    import torch

    from memact.models.model import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="use auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no GPU"):
            resolve_device("cuda:0")


def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(tmp_path, monkeypatch, capsys):
    from memact.models import model as m

    fast, slow = tmp_path / "fast", tmp_path / "slow"
    fast.write_text("flags\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    slow.write_text("flags\t: fpu sse2 avx2\n")
    assert m.cpu_bf16(str(fast)) is True and m.cpu_bf16(str(slow)) is False
    assert m.cpu_bf16(str(tmp_path / "none")) is None
    monkeypatch.setattr(m, "_WARNED", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(m, "cpu_bf16", lambda: False)
    assert m.torch_dtype("bfloat16") is torch.bfloat16 and m.torch_dtype("bfloat16") is torch.bfloat16
    assert capsys.readouterr().err.count("choose float32") == 1
    assert m.torch_dtype("float32") is torch.float32 and not capsys.readouterr().err
    monkeypatch.setattr(m, "_WARNED", set())
    monkeypatch.setattr(m, "cpu_bf16", lambda: True)
    m.torch_dtype("bfloat16")
    assert not capsys.readouterr().err

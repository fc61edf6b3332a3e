"""LoRA through DeepSpeed: `memact sft` and DCPO `train` with lora.enabled on the micro model.

Only the adapters are trained; every saved checkpoint is a plain HF directory with the
adapters merged in: target projections differ from the base by a rank <= r delta, every other
tensor is the base's, bit for bit.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from memact.dcpo.config import load_config

R, ALPHA = 4, 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the default lora.target_modules
LORA = ["lora.enabled=true", f"lora.r={R}", f"lora.alpha={ALPHA}"]


def _weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def _is_target(key: str) -> bool:
    return any(f".{t}." in key for t in TARGETS)


def _check_merged(before: dict, after: dict) -> None:
    """``after`` = ``before`` + a LoRA update: targets moved by a rank <= R delta, the rest identical."""
    assert set(after) == set(before)
    targets = [k for k in before if _is_target(k)]
    assert len(targets) == 2 * len(TARGETS)  # 2 layers of the micro model
    for k, w in before.items():
        if _is_target(k):
            delta = after[k].double() - w.double()
            assert delta.abs().max() > 1e-4, k  # the adapters did train
            assert torch.linalg.matrix_rank(delta, rtol=1e-5) <= R, k  # and nothing but them
        else:
            assert torch.equal(after[k], w), k


def _assert_plain_hf_dir(model_dir) -> None:
    """No peft files; loads with transformers (no missing or unexpected keys) and ``load_policy``."""
    from transformers import AutoModelForCausalLM

    from memact.models.model import load_policy

    names = {p.name for p in model_dir.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.startswith("adapter_") for n in names), names
    assert not any("lora" in k or "base_layer" in k for k in _weights(model_dir))
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    policy, tok = load_policy(model_dir)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(policy(input_ids=x).logits, model(input_ids=x).logits)


def _deepspeed(zero: int, tmp_path) -> str:
    """ZeRO 1 from the preset; ZeRO 3 with every parameter sharded (ds_zero3.json keeps the
    micro model's small parameters whole), so the adapters train on partitioned base weights."""
    if zero != 3:
        return f"deepspeed.zero_stage={zero}"
    from memact.dcpo.config import configs_dir

    ds = json.loads((configs_dir() / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "ds_zero3_shard_all.json"
    path.write_text(json.dumps(ds))
    return f"deepspeed.config={path}"


@pytest.mark.parametrize("zero", [1, 3])
def test_lora_sft_then_dcpo_through_deepspeed(micro_model_dir, scripted_jsonl, tmp_path, zero):
    from memact.dcpo.sft import sft
    from memact.dcpo.trainer import train

    ds = _deepspeed(zero, tmp_path)
    # SFT cold start with LoRA.
    sft_out = sft(load_config(None, [
        f"model.path={micro_model_dir}", f"sft.data={scripted_jsonl}", f"run.out_dir={tmp_path / 'sft'}",
        *LORA, ds, "optim.lr=1e-2", "optim.warmup_steps=0", "sft.epochs=1", "sft.segments_per_step=4",
        "batch.max_seq_len=1024", "logging.progress=false", "run.threads=1",
    ]))
    rows = [json.loads(line) for line in open(sft_out / "metrics.jsonl")]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    _assert_plain_hf_dir(sft_out)
    base, after_sft = _weights(micro_model_dir), _weights(sft_out)
    _check_merged(base, after_sft)

    # Two DCPO steps with LoRA from the merged SFT model (the KL reference: adapters switched off).
    run = train(load_config(None, [
        f"model.path={sft_out}", f"run.out_dir={tmp_path / 'dcpo'}", "run.steps=2", "run.threads=1", *LORA, ds,
        "rollout.prompts_per_step=2", "rollout.n_traj=2", "rollout.max_steps=2", "rollout.max_new_tokens=8",
        "batch.max_seq_len=1280", "dcpo.kl_coef=0.01", "dcpo.entropy_coef=0.01", "optim.lr=1e-2",
        "optim.warmup_steps=0", "logging.progress=false", "logging.table_every=0",
    ]))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0  # reference = the model with adapters off
    ckpt = run / "checkpoints" / "step_000002"
    _assert_plain_hf_dir(ckpt)
    merged = _weights(ckpt)
    _check_merged(after_sft, merged)

    # DeepSpeed's own state: the optimizer held the adapters only; the base stayed frozen, and
    # the HF weights are exactly base + (alpha / r) * B @ A.
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero == 3 else "mp_rank_00_model_states.pt"
    state = torch.load(ckpt / "trainer" / "deepspeed" / name, weights_only=False)
    trained = [n for group in state["param_shapes"] for n in group]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert len(trained) == 2 * 2 * len(TARGETS)  # A and B per target per layer
    if zero == 3:
        return  # ZeRO-3 saves the module's parameters as shards
    module = state["module"]
    prefix = "base_model.model."
    for key, w in after_sft.items():
        name = prefix + (key.replace(".weight", ".base_layer.weight") if _is_target(key) else key)
        if key == "lm_head.weight" and name not in module:
            continue  # tied to the embedding
        assert torch.equal(module[name], w), key  # frozen base
        if _is_target(key):
            stem = name[: -len(".base_layer.weight")]
            a, b = module[f"{stem}.lora_A.default.weight"], module[f"{stem}.lora_B.default.weight"]
            assert torch.allclose(merged[key], w + (ALPHA / R) * b @ a, atol=1e-6), key

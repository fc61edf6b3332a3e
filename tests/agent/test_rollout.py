"""End-to-end rollouts: the scripted expert, the no-memory baseline and a random tiny model."""

import json

import pytest
import torch

from memact.agent.rollout import rollout
from memact.cli import main
from memact.engines.base import SamplingParams
from memact.engines.hf import HFEngine
from memact.env.memory import DEFAULT_CONTEXT_BUDGET, Budget
from memact.models.model import load_policy
from memact.trajectory import check_invariants, segment_trajectory, trajectory_stats


def test_scripted_expert_k4_solves_under_budget():
    trajs = rollout("scripted", 4, 16, seed=0, progress=False)
    s = trajectory_stats(trajs)
    assert s["reward_mean"] >= 0.95
    assert s["context_peak_max"] <= DEFAULT_CONTEXT_BUDGET
    assert s["memory_actions"] >= 1
    for t in trajs:
        segs = segment_trajectory(t.calls)
        assert len(segs) == t.metrics["memory_actions"] + 1
        check_invariants(t.calls, segs)


def test_no_memory_overflows_at_k8():
    mem = trajectory_stats(rollout("scripted", 8, 8, seed=1, progress=False))
    nomem = trajectory_stats(rollout("scripted-nomem", 8, 8, seed=1, progress=False))
    assert mem["reward_mean"] >= 0.95 and mem["overflow_rate"] == 0
    assert nomem["overflow_rate"] == 1.0
    assert nomem["reward_mean"] < mem["reward_mean"] - 0.5


def test_plan_expert_notes_keep_the_questions_left_in_order():
    """scripted-plan: every note is the answers so far, then the questions still open, and the
    next search asks the note's first open question; it solves K=8 under the default budget."""
    import re

    from memact.agent.rollout import default_tokenizer
    from memact.agent.scripted import TODO
    from memact.models.chatml import parse_action

    tok = default_tokenizer()
    trajs = rollout("scripted-plan", 8, 6, seed=3, progress=False)
    s = trajectory_stats(trajs)
    assert s["reward_mean"] >= 0.95 and s["overflow_rate"] == 0
    assert s["context_peak_max"] <= DEFAULT_CONTEXT_BUDGET - 100  # room for a model's slips
    for t in trajs:
        acts = [parse_action(tok.decode(c.output_ids)) for c in t.calls]
        notes = [a.arguments["memory"] for a in acts if a.name == "prune_context"]
        assert notes, "the plan expert prunes"
        for i, a in enumerate(acts[:-1]):
            if a.name != "prune_context":
                continue
            note = a.arguments["memory"]
            answered = re.findall(r"(Q\d+): ", note.split(TODO)[0])
            todo = re.findall(r"(Q\d+) ([^;]+)", note.split(TODO)[1]) if TODO in note else []
            keys = answered + [k for k, _ in todo]
            assert sorted(keys, key=lambda k: int(k[1:])) == [f"Q{j}" for j in range(1, 9)]
            if todo and acts[i + 1].name == "search":
                assert acts[i + 1].arguments["query"] == todo[0][1].strip()
        assert TODO not in notes[-1]  # the last note holds every answer


def test_rollout_cli_writes_trajectories(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert main(["rollout", "--policy", "scripted", "-k", "2", "--n", "3", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert {"task_id", "reward", "metrics", "calls", "segments"} <= set(row)
        assert {"steps", "memory_actions", "peak_context_tokens", "mean_context_tokens", "total_input_tokens",
                "overflow"} <= set(row["metrics"])
        for seg in row["segments"]:
            assert len(seg["response_ids"]) == len(seg["loss_mask"]) == len(seg["logprobs"])
    assert "mean reward" in capsys.readouterr().err


def test_random_tiny_model_rollout(tiny_model_dir):
    trajs = rollout(str(tiny_model_dir), 1, 2, seed=0, budget=Budget(1040, 3),
                    sampling=SamplingParams(max_new_tokens=24), progress=False)
    assert len(trajs) == 2
    for t in trajs:
        assert t.calls and t.reward <= 0.0
        check_invariants(t.calls, segment_trajectory(t.calls))
        assert all(lp <= 0 for c in t.calls for lp in c.logprobs)


def test_hf_engine_logprobs_match_full_forward(tiny_model_dir):
    """Sampled tokens' log-probs equal a fresh forward over prompt + output (batched, left-padded)."""
    model, tok = load_policy(tiny_model_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    engine = HFEngine(model, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    prompts = [tok.encode("The color of", add_special_tokens=False), list(range(5, 40))]
    for temp in (0.0, 0.8):
        gens = engine.generate(prompts, SamplingParams(temperature=temp, max_new_tokens=12, seed=3))
        for p, g in zip(prompts, gens):
            ids = torch.tensor([p + g.output_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(p) - 1:-1].float()
            t = temp if temp > 0 else 1.0
            ref = torch.log_softmax(logits / t, -1).gather(-1, torch.tensor(g.output_ids)[:, None]).squeeze(-1)
            assert torch.allclose(ref, torch.tensor(g.logprobs), atol=1e-4), (ref, g.logprobs)
            if temp == 0:
                assert g.output_ids == logits.argmax(-1).tolist()


def test_every_scripted_spec_names_its_expert():
    from memact.agent.scripted import SCRIPTED, scripted_expert
    from memact.env.task import make_tasks

    tasks = make_tasks(1, 2, 0)
    experts = {spec: scripted_expert(spec, tasks) for spec in SCRIPTED}
    assert [(e.memory, e.plan) for e in experts.values()] == [(True, False), (True, True), (False, False)]
    assert scripted_expert("scripted-plan", tasks, memory=False).memory is False  # a strategy without the tool
    with pytest.raises(ValueError, match="not a scripted policy"):
        scripted_expert("scripted-nope", tasks)

"""The weight push without vLLM: buckets, tied embeddings, the worker extension, ZeRO-3 gathering."""

import importlib.util

import pytest
import torch

from memact.engines.vllm import (
    VLLMEngine,
    WeightSyncExtension,
    _safetensors_bytes,
    bucket_by_layer,
    iter_zero3_params,
    vllm_available,
)


def _named(model):
    return list(model.named_parameters())


@pytest.fixture(scope="module")
def model():
    from memact.models.model import build_model

    return build_model("tiny", vocab_size=300)


def test_buckets_never_split_a_layer(model):
    named = _named(model)
    layer_bytes = sum(p.numel() * 4 for n, p in named if ".layers.0." in n)
    buckets = list(bucket_by_layer(named, bucket_bytes=layer_bytes // 2))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]  # order kept, nothing lost
    for b in buckets:
        layers = {n.split(".layers.")[1].split(".")[0] for n, _ in b if ".layers." in n}
        assert len(layers) <= 1, layers  # half a layer of budget: one layer per bucket
    for i in range(4):
        assert sum(any(f".layers.{i}." in n for n, _ in b) for b in buckets) == 1
    assert len(list(bucket_by_layer(named, bucket_bytes=1 << 40))) == 1
    with pytest.raises(ValueError):
        next(bucket_by_layer(named, bucket_bytes=0))


class _FakeLLM:
    """Stands in for vllm.LLM: runs the RPC on a worker with the extension, in process."""

    def __init__(self):
        self.worker = WeightSyncExtension()
        self.worker.model_runner = self
        self.loaded, self.calls = {}, []

    def reload_weights(self, weights_iterator):
        self.loaded.update(weights_iterator)

    def collective_rpc(self, method, args=()):
        self.calls.append(method)
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def test_sync_weights_streams_buckets_adds_tied_head_then_resets_cache(model):
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM needed: the push logic alone
    engine.llm, engine.tie_word_embeddings = _FakeLLM(), True
    named = _named(model)
    sent = engine.sync_weights(iter(named), bucket_bytes=100_000)
    assert sent == len(named) + 1
    calls = engine.llm.calls
    assert calls[-1] == "reset_prefix_cache" and calls.count("memact_load_weights") > 2
    loaded = engine.llm.loaded
    assert torch.equal(loaded["lm_head.weight"], model.model.embed_tokens.weight)
    assert all(torch.equal(loaded[n], p) for n, p in named)
    # An explicit lm_head.weight is not sent twice.
    engine.llm = _FakeLLM()
    assert engine.sync_weights(named + [("lm_head.weight", model.lm_head.weight)]) == len(named) + 1


def test_safetensors_bytes_accepts_shared_tensors():
    from safetensors.torch import load

    w = torch.randn(4, 3, dtype=torch.bfloat16)
    out = load(_safetensors_bytes([("a", w), ("b", w), ("c", w.t())]))
    assert torch.equal(out["a"], w) and torch.equal(out["b"], w) and torch.equal(out["c"], w.t())


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_without_vllm_the_engine_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\]"):
        VLLMEngine(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_iter_zero3_params_gathers_whole_weights_bucket_by_bucket():
    """ZeRO-3 in one process (world size 1): whole tensors come out, shards stay sharded.

    In a fresh interpreter: an in-process vLLM engine (tests/vllm/test_vllm_engine.py) tears
    down torch.distributed when it stops, and DeepSpeed's cached process groups go stale."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_weight_sync as t; t._zero3_check()"
    env = {k: v for k, v in os.environ.items()  # not this process's rendezvous: its port is taken
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)


def _zero3_check():
    from memact.dcpo.distributed import init_env
    from memact.models.model import build_model

    init_env()
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no 24 s JIT build of an op unused here
    model = build_model("tiny", vocab_size=300)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    assert all(p.numel() == 0 for p in engine.module.parameters())  # sharded away
    got = list(iter_zero3_params(engine.module, bucket_bytes=100_000))
    assert [n for n, _ in got] == [n for n, _ in engine.module.named_parameters()]
    assert all(torch.equal(t, ref[n]) for n, t in got)
    assert all(p.numel() == 0 for p in engine.module.parameters())  # released again

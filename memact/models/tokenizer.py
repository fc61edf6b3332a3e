"""A tokenizer trained locally on the task's own text (no hub access needed).

Byte-level BPE from the ``tokenizers`` library, ChatML special tokens, the hermes tool
markup, and one token for each entity name, attribute value and record id of the
synthetic world: a tiny model trained from scratch learns single-token recall far more
easily than multi-token copying (docs/design.md, section 6).
"""

from __future__ import annotations

import json
import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from memact.env.memory import ID_POOL
from memact.env.task import make_task, world_vocabulary
from memact.env.tools import AgentEnv, tool_call_json
from memact.models.chatml import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    SYSTEM_PROMPT,
    SYSTEM_PROMPT_NO_MEMORY,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
)
from memact.util.seeds import derive_seed

SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
MARKUP_TOKENS = [TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE]


def task_corpus(n_tasks: int = 300, seed: int = 0) -> list[str]:
    """Text of the kind the agent reads and writes: prompts, documents, calls, answers."""
    rng = random.Random(seed)
    texts = [SYSTEM_PROMPT, SYSTEM_PROMPT_NO_MEMORY]
    for i in range(n_tasks):
        task = make_task(derive_seed(seed, "corpus", i), k=rng.randint(1, 8))
        env = AgentEnv(task, seed=i)
        texts.append(json.dumps(env.tools))
        texts.append(env.user_text())
        texts.extend(rng.sample(task.documents, min(6, len(task.documents))))
        for q in task.questions:
            texts.append(tool_call_json("search", {"query": q.query, "topk": 3}))
        note = "; ".join(f"{q.key}: {q.answer}" for q in task.questions)
        texts.append(tool_call_json("prune_context", {"memory": note, "delete_ids": rng.sample(ID_POOL, 2)}))
        texts.append("FINAL_ANSWER: " + json.dumps(task.gold()))
        texts.append(f"Deleted 2 record(s): {ID_POOL[i]}, {ID_POOL[i + 1]}. Memory saved.")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 1024, world_tokens: bool = True) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and wrap it as a ChatML Hugging Face tokenizer.

    Args:
        texts: training text.
        vocab_size: size of the BPE part (bytes + merges + special tokens).
        world_tokens: add one token per entity name, attribute value and record id.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in MARKUP_TOKENS])
    if world_tokens:
        # single_word: "red" must not match inside "stored".
        words = world_vocabulary() + ID_POOL
        tok.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in words])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        additional_special_tokens=[IM_START],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 32768
    return hf

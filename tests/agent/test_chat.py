"""Tokenizer and token-span rendering: single-token world words, exact spans."""

from memact.agent.chat import ChatRenderer
from memact.env.memory import ID_POOL
from memact.env.task import ATTRIBUTES, NAME_POOL, make_task
from memact.env.tools import AgentEnv
from memact.models.chatml import SYSTEM_PROMPT, call_text, parse_action, render_chat


def test_world_words_and_ids_are_single_tokens(tokenizer):
    for word in NAME_POOL[:50] + ATTRIBUTES["color"] + ATTRIBUTES["city"] + ID_POOL[:50]:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    # Not inside other words.
    ids = tokenizer.encode("stored", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("red") not in ids


def test_round_trip(any_tokenizer):
    tokenizer = any_tokenizer
    text = 'FINAL_ANSWER: {"Q1": "teal", "Q2": "Varnholm"}<|im_end|>'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_span_prompt_equals_chat_template(any_tokenizer):
    tokenizer = any_tokenizer
    """Head + record spans + generation prompt == the template applied to the same messages (with
    memact's tools block where the template drops tools, as SmolLM2's does)."""
    r = ChatRenderer(tokenizer)
    env = AgentEnv(make_task(1, 2), seed=0)
    head = r.head_ids(SYSTEM_PROMPT, env.user_text(), env.tools)
    turns = [call_text("search", {"query": "pet of X"}), call_text("search", {"query": "job of Y"})]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": env.user_text()}]
    for text in turns:
        out = r.encode(text + "<|im_end|>")
        result = env.step(parse_action(text), text)
        env.memory.get(result.record_id).ids = r.record_ids(out, result.response_text)
        messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": result.response_text}]
    spans = r.prompt_ids(head, env.memory.records)
    templ = render_chat(tokenizer, messages, env.tools, add_generation_prompt=True)
    assert spans == r.encode(templ)
    assert all(f'"name": "{t["name"]}"' in r.decode(head) for t in env.tools)  # never dropped
    # Deleting a record removes exactly its span.
    first = env.memory.records[0]
    env.memory.drop([first.record_id])
    assert r.prompt_ids(head, env.memory.records) == head + env.memory.records[0].ids + r.generation_prompt_ids


def test_truncated_turn_is_closed(any_tokenizer):
    tokenizer = any_tokenizer
    r = ChatRenderer(tokenizer)
    out = r.encode("<tool_call>\n{")
    assert r.closing_ids(out) == r.encode("<|im_end|>\n")
    assert r.closing_ids(out + [r.im_end_id]) == r.encode("\n")

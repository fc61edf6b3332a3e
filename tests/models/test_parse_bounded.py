"""Issue 21, item 1: one bounded, total parser for model output and request bodies.

Before memact.util.safejson, 994+ levels of ``[`` in a tool call raised RecursionError out of
parse_action (one such turn ended every episode of its batch) and ``memact serve`` answered 500.
"""

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from memact.env.task import parse_final_answer
from memact.models.chatml import parse_action
from memact.util.safejson import parse_json

DEEP = "[" * 5000 + "]" * 5000


def _call(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call><|im_end|>"


def test_deeply_nested_tool_call_is_an_invalid_action():
    for body in (DEEP, '{"name": "search", "arguments": ' + DEEP + "}", "{" * 3000,
                 '{"name": "search", "arguments": ' + json.dumps(json.dumps(json.loads("[" * 200 + "]" * 200))) + "}",
                 '{"name": "search", "arguments": {"query": ' + "9" * 5000 + "}}"):
        action = parse_action(_call(body))
        assert action.kind == "invalid" and action.error, body[:40]
    assert parse_final_answer("FINAL ANSWER: " + "{\"Q1\": " * 3000) is None
    assert parse_final_answer('FINAL ANSWER: {"Q1": ' + "1" * 5000 + "}") is None


def test_parse_json_bounds():
    assert parse_json('{"a": [1, {"b": "[[[["}]}') == ({"a": [1, {"b": "[[[["}]}, None)
    assert parse_json(DEEP)[1].startswith("JSON nested 5000 levels deep")
    assert parse_json(b"\xff")[1].startswith("JSON is not UTF-8")
    assert parse_json(r'["\\", "\\\"[[", "a\\b"]') == (["\\", '\\"[[', "a\\b"], None)  # escapes inside strings
    assert parse_json("1" * 5000)[1].startswith("unreadable JSON")
    assert parse_json("x" * 100, max_chars=10)[1].startswith("JSON of 100 characters")


def _nested(rng: random.Random) -> str:
    depth = rng.choice([1, 10, 63, 64, 65, 500, 994, 3000])
    opens = "".join(rng.choice("[{") for _ in range(depth))
    return opens + "".join("]" if c == "[" else "}" for c in reversed(opens))


JUNK = ["\ud800", "\udfff", "\x00", "\x1b[2J", "\u202e", "NaN", "1e999", "-" * 10, "9" * 5000, "\\", '"', "}{"]


def test_fuzzed_turns_give_an_action_or_an_error_never_an_exception(capsys):
    rng = random.Random(0)
    tried = errors = 0
    for _ in range(3000):
        parts = [rng.choice(JUNK + [_nested(rng), '{"name": "search", "arguments": ', "<tool_call>", "</tool_call>",
                                    "FINAL ANSWER: {", '"Q1": "x"}', "<|im_end|>"]) for _ in range(rng.randint(1, 6))]
        text = "".join(parts)
        for turn in (text, _call(text)):
            action = parse_action(turn)  # must not raise
            parse_final_answer(turn)
            tried += 1
            errors += action.kind == "invalid"
    with capsys.disabled():
        print(f"\n[fuzz] parse_action: inputs tried {tried}, invalid actions returned {errors}, exceptions 0")
    assert tried == 6000 and errors > 0


@settings(max_examples=400, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                    max_leaves=30))
def test_any_json_as_a_tool_call_is_an_action_or_an_error(value):
    body = json.dumps(value)
    action = parse_action(_call(body))
    assert action.kind in ("tool", "invalid")
    action = parse_action(_call(json.dumps({"name": "search", "arguments": body})))
    assert action.kind in ("tool", "invalid")


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_any_text_is_an_action_or_an_error(text):
    assert parse_action(text).kind in ("tool", "invalid", "final")
    assert parse_action(_call(text)).kind in ("tool", "invalid", "final")
    parse_final_answer(text)


def _depth_by_chars(text):
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, in_string) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return deepest


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='[]{}"\\ab,', max_size=60))
def test_nesting_depth_scans_like_a_character_loop(text):
    from memact.util.safejson import nesting_depth

    assert nesting_depth(text) == _depth_by_chars(text)

"""Proposers: the mutate baseline and the parsing of a chat model's reply."""

import difflib

import pytest
from research_helpers import STUB_TRAIN, CannedServer

from memact.research.proposers import (
    TUNABLES,
    MutateProposer,
    find_constants,
    make_proposer,
    parse_reply,
    set_constants,
)
from memact.research.workspace import read_file, template_dir


@pytest.mark.parametrize("template", ["cpu", "gpu"])
def test_mutate_changes_only_constants_and_compiles(template):
    source = read_file(template_dir(template))
    before = {k: v[3] for k, v in find_constants(source).items()}
    proposer = MutateProposer(seed=3)
    for experiment in range(1, 41):
        proposal = proposer.propose("context", source, experiment)
        new = proposal.new_source
        compile(new, "train.py", "exec")
        changed = [
            line for line in difflib.ndiff(source.splitlines(), new.splitlines()) if line[:2] in ("- ", "+ ")
        ]
        after = {k: v[3] for k, v in find_constants(new).items()}
        moved = {k for k in before if before[k] != after[k]}
        assert 1 <= len(moved) <= 2 and moved <= set(TUNABLES)
        assert len(changed) == 2 * len(moved)  # one line out, one line in, per constant
        for line in changed:  # the changed lines are the constants' lines, comments kept
            name = line[2:].split(" = ")[0]
            assert name in moved
        for name in moved:
            assert TUNABLES[name].low <= after[name] <= TUNABLES[name].high
        assert after["WIDTH"] % after["N_HEADS"] == 0
        assert proposal.description.count("->") == len(moved)


def test_mutate_is_seeded():
    a = MutateProposer(seed=1).propose("", STUB_TRAIN, 5)
    b = MutateProposer(seed=1).propose("", STUB_TRAIN, 5)
    assert a == b
    assert any(MutateProposer(seed).propose("", STUB_TRAIN, 5) != a for seed in range(2, 6))


def test_mutate_respects_bounds_at_the_edge():
    source = set_constants(STUB_TRAIN, {"DEPTH": 1, "LEARNING_RATE": 5e-2})
    for experiment in range(1, 30):
        after = {k: v[3] for k, v in find_constants(MutateProposer(0).propose("", source, experiment).new_source).items()}
        assert after["DEPTH"] >= 1 and after["LEARNING_RATE"] <= 5e-2


def test_set_constants_keeps_comments_and_names_missing_constants():
    new = set_constants(STUB_TRAIN, {"LEARNING_RATE": 0.00123456, "WIDTH": 96})
    assert "LEARNING_RATE = 0.00123  # peak learning rate\n" in new
    assert "WIDTH = 96  # multiple of N_HEADS\n" in new
    with pytest.raises(ValueError, match="NOT_THERE"):
        set_constants(STUB_TRAIN, {"NOT_THERE": 1})


def test_parse_reply_with_fence_and_missing_prefixes():
    reply = (
        "Thinking...\nDESCRIPTION: raise the learning rate\n```diff\n--- train.py\n+++ train.py\n"
        "@@ -1 +1 @@\n-LEARNING_RATE = 0.001\n+LEARNING_RATE = 0.002\n```\n"
    )
    proposal = parse_reply(reply)
    assert proposal.description == "raise the learning rate"
    assert proposal.patch.startswith("--- a/train.py\n+++ b/train.py\n@@")


def test_parse_reply_without_a_diff_gives_an_empty_patch():
    assert parse_reply("DESCRIPTION: nothing").patch == ""


def test_make_proposer_names_bad_specs(monkeypatch):
    with pytest.raises(ValueError, match="unknown proposer 'magic'"):
        make_proposer("magic")
    monkeypatch.delenv("MEMACT_POLICY_URL", raising=False)
    with pytest.raises(RuntimeError, match="memact serve runs/policy"):
        make_proposer("policy:runs/policy")


def test_endpoint_retries_through_the_shared_client_and_raises_endpoint_error():
    from memact.research.endpoint import Endpoint, EndpointError
    from memact.util.http import ChatClientError

    message = {"role": "assistant", "content": "DESCRIPTION: x"}
    replies = [(409, {"error": {"message": "lock timeout"}}), (200, {"choices": [{"message": message}]}),
               (400, {"error": {"message": "unknown model 'stub'"}})]
    with CannedServer(replies) as server:
        endpoint = Endpoint(base_url=server.url, model="stub", timeout_s=10,
                            retries=1, backoff_s=0.001, max_backoff_s=0.01)
        assert endpoint.chat([{"role": "user", "content": "go"}]) == message  # the 409 was retried
        with pytest.raises(EndpointError) as err:
            endpoint.chat([{"role": "user", "content": "go"}])
    assert isinstance(err.value, ChatClientError) and err.value.status == 400 and err.value.attempts == 1
    assert "HTTP 400: unknown model 'stub' (after 1 attempt(s))" in str(err.value)
    assert f"{server.url}/chat/completions" in str(err.value) and not replies


def test_endpoint_openai_reads_the_shared_environment(monkeypatch):
    from memact.research.endpoint import Endpoint

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ep = Endpoint.openai("gpt-x")
    assert (ep.base_url, ep.api_key, ep.model) == ("https://api.openai.com/v1", "", "gpt-x")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert (Endpoint.openai("m").base_url, Endpoint.openai("m").api_key) == ("http://127.0.0.1:9/v1", "k")


def test_reply_text_joins_content_parts_and_refuses_what_is_not_text():
    from memact.research.proposers import ReplyError, proposal_from_message, reply_text

    parts = [{"type": "text", "text": "DESCRIPTION: a"}, {"type": "image_url", "image_url": {}}, {"text": "\nb"}]
    assert reply_text({"content": parts}) == "DESCRIPTION: a\nb"
    assert reply_text({"content": "x\ud800y"}) == "x\ufffd\ufffd\ufffdy"  # a lone surrogate cannot be written
    for message, reason in [("DESCRIPTION: x", "message is a str"), ({"content": 42}, "content is a int"),
                            ({"content": None, "tool_calls": []}, "has no content"),
                            ({"content": [{"type": "image_url"}]}, "without text"), (None, "message is a NoneType")]:
        with pytest.raises(ReplyError, match=reason):
            reply_text(message)
    assert proposal_from_message({"content": parts}).description == "a"

"""Fuzzing the proposer-reply handling: any reply is a proposal or a logged proposer failure.

Hypothesis feeds arbitrary JSON (nested, huge numbers, surrogates, control characters) as the
endpoint's reply object, as the reply's message, and as the message's content, through the
real Endpoint -> ChatProposer -> loop path; and arbitrary bodies over HTTP into the loop itself.
Each test prints its counts: inputs tried, failures logged, proposals accepted, exceptions raised.
"""

import json
import os
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from research_helpers import STUB_TRAIN, CannedServer, make_workspace

from memact.research import workspace as ws
from memact.research.endpoint import Endpoint
from memact.research.history import HeuristicMemory, Outcome
from memact.research.loop import ProposerFailure, ResearchLoop, RunConfig, propose_or_failure
from memact.research.proposers import ChatProposer, Proposal
from memact.research.results import read_results
from memact.util.http import ChatClient

ANY_CHAR = st.characters(blacklist_categories=())  # surrogates and control characters included
TEXT = st.text(ANY_CHAR, max_size=60) | st.sampled_from(
    ["DESCRIPTION: x", "```diff\n--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-a\n+b\n```", "\ud800", "\x00", ""]
)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30, max_value=10**400)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
PARTS = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 3]), "text": JSON}) | JSON,
                 max_size=4)
CONTENT = JSON | PARTS | TEXT
MESSAGE = JSON | st.fixed_dictionaries({"role": JSON, "content": CONTENT}) | st.fixed_dictionaries(
    {"content": CONTENT, "tool_calls": JSON})
REPLY = JSON | st.fixed_dictionaries({"choices": JSON}) | st.fixed_dictionaries(
    {"choices": st.lists(st.fixed_dictionaries({"message": MESSAGE}) | JSON, max_size=2)})


def _nested(n):
    """``n`` levels of lists: deeper than json and repr recurse."""
    x = []
    for _ in range(n):
        x = [x]
    return x


DEPTHS = st.integers(min_value=1, max_value=3000)
DEEP = (DEPTHS.map(_nested) | DEPTHS.map(lambda n: {"choices": [{"message": {"role": "assistant", "content": _nested(n)}}]})
        | DEPTHS.map(lambda n: {"choices": _nested(n)}))


def handle(proposer, experiment=1):
    """The loop's handling of a proposer's answer: a Proposal, or the reason of a failure it logs."""
    got = propose_or_failure(proposer, "context", "LEARNING_RATE = 0.001\n", experiment)
    if isinstance(got, ProposerFailure):
        assert got.reason and "\n" not in got.reason
        return got.reason
    assert isinstance(got, Proposal) and got.description and "\n" not in got.description
    got.description.encode("utf-8")  # fits a TSV row and a git message
    assert got.patch is None or isinstance(got.patch, str)
    return got


class Counts:
    def __init__(self, name):
        self.name, self.tried, self.failures, self.accepted, self.raised = name, 0, 0, 0, 0
        self.examples = []

    def feed(self, fn):
        self.tried += 1
        try:
            result = fn()
        except Exception as err:  # counted; the test asserts at the end that none escaped
            self.raised += 1
            if len(self.examples) < 5:
                self.examples.append(f"{type(err).__name__}: {str(err)[:100]}")
            return
        if isinstance(result, str):
            self.failures += 1
        else:
            self.accepted += 1

    def report(self, capsys):
        with capsys.disabled():
            print(f"\n[fuzz {self.name}] inputs tried {self.tried}, failures logged {self.failures}, "
                  f"accepted {self.accepted}, exceptions raised {self.raised}")
        assert self.raised == 0, self.examples
        assert self.tried == self.failures + self.accepted


class _Fixed:
    def __init__(self, message):
        self.message = message

    def chat(self, messages, **extra):
        return self.message


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_fuzz_reply_objects_through_the_endpoint(capsys):
    counts = Counts("reply object -> Endpoint -> ChatProposer")
    endpoint = Endpoint(base_url="http://127.0.0.1:9/v1", model="stub", retries=0)

    @FUZZ
    @given(REPLY | DEEP)
    def run(reply):
        with mock.patch.object(ChatClient, "post", lambda self, body: reply):
            counts.feed(lambda: handle(ChatProposer(endpoint)))

    run()
    counts.report(capsys)


def test_fuzz_messages_and_contents_through_the_proposer(capsys):
    counts = Counts("message/content -> ChatProposer")

    @FUZZ
    @given(MESSAGE | CONTENT.map(lambda c: {"role": "assistant", "content": c}))
    def run(message):
        counts.feed(lambda: handle(ChatProposer(_Fixed(message))))

    run()
    counts.report(capsys)


def _body(obj):
    if isinstance(obj, bytes):
        return obj
    try:
        return json.dumps(obj).encode("utf-8", "surrogatepass")
    except (ValueError, OverflowError, RecursionError):
        return repr(obj).encode("utf-8", "surrogatepass")


def test_fuzz_http_bodies_into_the_loop(tmp_path, capsys):
    """Arbitrary reply bodies over loopback HTTP into ResearchLoop.experiment: each one logs a row."""
    workdir = make_workspace(tmp_path / "ws", STUB_TRAIN)
    with CannedServer() as server:
        endpoint = Endpoint(base_url=server.url, model="stub", retries=0, timeout_s=10)
        cfg = RunConfig(budget_s=2, experiments=10**6, baseline_runs=2)
        loop = ResearchLoop(workdir, cfg, ChatProposer(endpoint), HeuristicMemory(), log=lambda msg: None)
        loop.recover()
        loop.state.update(baseline=[3.40, 3.45], margin=0.05, best_val=3.40, best_experiment=0)  # as if measured
        loop.memory.add_outcome(Outcome(0, "keep", 3.40, "baseline", "no change"))
        counts = Counts("HTTP body -> ResearchLoop.experiment")

        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
        @given(REPLY.map(_body) | st.binary(max_size=80) | MESSAGE.map(lambda m: _body({"choices": [{"message": m}]})))
        def run(body):
            server.replies[:] = [body]
            rows_before = loop.state["rows_logged"]

            def one():
                loop.state["proposer_failures"] = 0
                loop.experiment()
                assert loop.state["rows_logged"] == rows_before + 1
                row = read_results(os.path.join(workdir, ws.RESULTS_FILE))[-1]
                assert not ws.is_dirty(workdir)
                return row.description if row.status == "crash" and row.commit == "-" else Proposal(row.description)

            counts.feed(one)

        run()
    counts.report(capsys)

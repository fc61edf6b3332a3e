"""Retrieval backends (`memact.env.retrieval`): the task's bm25s, a saved corpus index and the
Search-R1-format HTTP server give the same documents; a server that dies mid-run marks the
episodes that needed it and the run goes on."""

import json
import threading
import urllib.error
import urllib.request

import pytest
from data_helpers import hotpot_rows, write_jsonl

from memact.agent.cli_retrieval import make_retrieval_server
from memact.agent.rollout import rollout
from memact.cli import main
from memact.env import retrieval
from memact.env.memory import Budget
from memact.env.retrieval import CorpusIndex, HTTPRetriever, RetrievalError
from memact.env.sources import build_corpus, parse_source
from memact.env.tools import BM25Search


@pytest.fixture(scope="module")
def corpus_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieval")
    data = write_jsonl(tmp / "hotpot.jsonl", hotpot_rows(60))
    assert main(["index", "--data", f"hotpotqa:{data}", "--out", str(tmp / "index")]) == 0
    return data, tmp / "index"


class Served:
    """The retrieval server of an index in a thread; ``stop()`` kills it."""

    def __init__(self, index_dir):
        self.server = make_retrieval_server(str(index_dir), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


QUERIES = ["Town3", "river Blue7", "Which river flows through Town12?", "mill", "floods in spring", "Town59 River0",
           "nothing matches zzz", "the"]


def test_three_backends_return_the_same_documents(corpus_setup):
    data, index_dir = corpus_setup
    docs = build_corpus(parse_source(f"hotpotqa:{data}").questions("all"))
    in_process, index = BM25Search(docs), CorpusIndex(index_dir)
    served = Served(index_dir)
    try:
        http = HTTPRetriever(served.url)
        compared = 0
        for q in QUERIES:
            for k in (1, 3, 5):
                a, b, c = in_process(q, k), index(q, k), http(q, k)
                assert a == b == c, (q, k)
                compared += bool(a)
        assert compared >= 15  # most queries find something
        # Search-R1's scored layout as well.
        body = json.dumps({"queries": ["river Blue3", "Town4"], "topk": 2, "return_scores": True}).encode()
        req = urllib.request.Request(served.url + "/retrieve", data=body, headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=5).read())
        assert [d["document"]["contents"] for d in reply["result"][0]] == index("river Blue3", 2)
        assert reply["result"][0][0]["score"] >= reply["result"][0][1]["score"] > 0
    finally:
        served.stop()


@pytest.mark.parametrize("body,message", [
    ({"topk": 3}, "'queries' must be a non-empty list"), ({"queries": "Town3"}, "'queries' must be"),
    ({"queries": ["a"], "topk": 0}, "'topk' must be an integer"), ({"queries": ["a"], "top_k": 3}, "unknown field"),
])
def test_retrieval_server_names_a_bad_request(corpus_setup, body, message):
    served = Served(corpus_setup[1])
    try:
        req = urllib.request.Request(served.url + "/retrieve", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 400 and message in json.loads(err.value.read())["error"]["message"]
    finally:
        served.stop()


def test_rollouts_through_each_backend_agree(corpus_setup, tmp_path):
    data, index_dir = corpus_setup
    served = Served(index_dir)
    try:
        rewards = {}
        for spec in ("task", f"index:{index_dir}", f"http:{served.url}"):
            out = tmp_path / f"{spec.split(':')[0]}.jsonl"
            assert main(["rollout", "--policy", "scripted", "--data", f"hotpotqa:{data}", "--retrieval", spec, "-k", "3",
                         "--n", "4", "--context-budget", "4000", "--out", str(out), "--quiet"]) == 0
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            rewards[spec.split(":")[0]] = [(r["reward"], r["metrics"]["total_input_tokens"]) for r in rows]
        assert rewards["task"] == rewards["index"] == rewards["http"]
        assert all(r == 1.0 for r, _ in rewards["task"])
    finally:
        served.stop()


def test_a_server_that_dies_mid_run_marks_episodes_and_the_run_goes_on(corpus_setup, monkeypatch):
    data, index_dir = corpus_setup
    monkeypatch.setattr(retrieval, "HTTP_RETRIES", 1)
    monkeypatch.setattr(retrieval, "HTTP_TIMEOUT_S", 2.0)
    served = Served(index_dir)
    routes = served.server.app.routes
    method, retrieve = routes["/retrieve"]
    answered = {"n": 0}

    def dying(body):  # answers the first step's 4 searches, then the server goes away
        answered["n"] += 1
        if answered["n"] > 4:
            threading.Thread(target=served.stop, daemon=True).start()
            raise ConnectionResetError("server going down")
        return retrieve(body)

    routes["/retrieve"] = (method, dying)
    source = parse_source(f"hotpotqa:{data}", f"http:{served.url}")
    # Two one-question tasks are done after one search; two three-question ones search again.
    tasks = source.tasks(2, 1, seed=5, split="train") + source.tasks(2, 3, seed=6, split="train")
    trajs = rollout("scripted", 3, 4, tasks=tasks, budget=Budget(4000, 40), progress=False)
    assert [t.error is None for t in trajs] == [True, True, False, False]
    assert [t.reward for t in trajs[:2]] == [1.0, 1.0]
    assert all(t.error.startswith("search failed: POST http://127.0.0.1:") and "/retrieve" in t.error
               and t.reward < 0 for t in trajs[2:])
    with pytest.raises(RetrievalError):
        HTTPRetriever(served.url, max_retries=0, timeout_s=1)("Town3")


@pytest.mark.parametrize("data,spec,message", [
    ("synthetic", "index:/no/such", "not an index written by `memact index`"),
    ("synthetic", "http:", "expected task \\| index:DIR \\| http:URL"),
    ("synthetic", "bm25", "expected task"),
    ("long", "http://127.0.0.1:1", "needs a data file source"),
])
def test_bad_retrieval_specs(data, spec, message):
    with pytest.raises(ValueError, match=message):
        parse_source(data, spec)

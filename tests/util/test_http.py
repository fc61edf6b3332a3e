"""The chat-completions clients (memact.util.http: the standard-library ChatClient and the
OpenAIChatClient on the openai SDK, each test run with both) against a scripted server on loopback.

The server runs in a thread on 127.0.0.1 with a free port and is stopped at the end of each
test; every client has a short timeout, at most 3 attempts and millisecond backoffs.
"""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from memact.util.http import (
    DEFAULT_BASE_URL,
    RETRY_STATUSES,
    ChatClient,
    ChatClientError,
    OpenAIChatClient,
    _retry_after,
    message_text,
    openai_env,
)

OK = {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
      "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


CLIENT = {"cls": ChatClient}


@pytest.fixture(autouse=True, params=["stdlib", "openai-sdk"])
def client_kind(request):
    """Every test with both clients: one retry rule, one set of failure messages."""
    CLIENT["cls"] = ChatClient if request.param == "stdlib" else OpenAIChatClient
    yield request.param
    CLIENT["cls"] = ChatClient


def _json(status, obj, headers=None):
    return status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}


class Scripted:
    """A server answering each POST with the next ``(status, body, headers)``; records what came."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests = []  # (monotonic time, headers, decoded body)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                data = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((time.monotonic(), dict(self.headers), json.loads(data)))
                status, body, headers = outer.replies.pop(0)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def client(self, **kwargs):
        return CLIENT["cls"](self.base_url, **{"timeout_s": 10, "max_retries": 2, "backoff_s": 0.001,
                                            "max_backoff_s": 0.01, **kwargs})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_retryable_status_then_success():
    with Scripted([_json(503, {"error": {"message": "warming up"}}), _json(200, OK)]) as srv:
        reply, choice = srv.client().complete(BODY)
    assert reply == OK and choice["message"]["content"] == "hi"
    assert len(srv.requests) == 2 and all(r[2] == BODY for r in srv.requests)


@pytest.mark.parametrize("status", sorted(RETRY_STATUSES))
def test_every_retry_status_is_retried(status):
    with Scripted([_json(status, {"error": "busy"}), _json(200, OK)]) as srv:
        assert srv.client().post(BODY) == OK
    assert len(srv.requests) == 2


def test_400_fails_at_once_with_the_servers_message():
    with Scripted([_json(400, {"error": {"message": "max_tokens must be positive", "type": "invalid"}})]) as srv:
        with pytest.raises(ChatClientError) as err:
            srv.client().post(BODY)
    e = err.value
    assert str(e) == (f"POST {srv.base_url}/chat/completions: HTTP 400: max_tokens must be positive "
                      "(after 1 attempt(s))")
    assert e.status == 400 and e.attempts == 1 and e.url == f"{srv.base_url}/chat/completions"
    assert len(srv.requests) == 1


def test_retryable_status_gives_up_with_status_and_attempts():
    plain = (502, b"<html>Bad Gateway</html>", {"Content-Type": "text/html"})
    with Scripted([plain] * 3) as srv:
        with pytest.raises(ChatClientError, match=r"HTTP 502: <html>Bad Gateway</html> \(after 3 attempt\(s\)\)"):
            srv.client(max_retries=2).post(BODY)
    assert len(srv.requests) == 3


def test_retry_after_is_honoured_and_capped():
    with Scripted([_json(429, {"error": "slow down"}, {"Retry-After": "0.3"}), _json(200, OK)]) as srv:
        assert srv.client(max_backoff_s=5.0).post(BODY) == OK
    (t0, _, _), (t1, _, _) = srv.requests
    assert t1 - t0 >= 0.3  # backoff alone would be ~1 ms
    # A Retry-After above max_backoff_s waits max_backoff_s.
    with Scripted([_json(503, {"error": "down"}, {"Retry-After": "120"}), _json(200, OK)]) as srv:
        start = time.monotonic()
        assert srv.client(max_backoff_s=0.05).post(BODY) == OK
    assert 0.05 <= srv.requests[1][0] - srv.requests[0][0] and time.monotonic() - start < 5


def test_retry_after_forms():
    assert _retry_after("2") == 2.0 and _retry_after("0.5") == 0.5 and _retry_after(None) is None
    assert _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no extra wait
    client = ChatClient("http://x", backoff_s=1.0, max_backoff_s=8.0)
    assert 0.5 <= client.delay(0) < 1.0 and 4.0 <= client.delay(3) < 8.0 and 4.0 <= client.delay(10) < 8.0
    assert client.delay(0, retry_after=3.0) == 3.0 and client.delay(0, retry_after=60.0) == 8.0


@pytest.mark.parametrize("body, what", [(b"<html>ok</html>", "reply is not JSON"),
                                        (b"[1, 2]", "reply is not a JSON object")])
def test_a_reply_that_is_not_a_json_object_is_an_error(body, what):
    with Scripted([(200, body, {"Content-Type": "application/json"})]) as srv:
        with pytest.raises(ChatClientError, match=what) as err:
            srv.client().post(BODY)
    assert err.value.attempts == 1 and len(srv.requests) == 1  # not retried: the server answered


def test_a_reply_without_a_message_is_an_error():
    with Scripted([_json(200, {"choices": []})]) as srv:
        with pytest.raises(ChatClientError, match=r"no choices\[0\]\.message"):
            srv.client().complete(BODY)


def test_connection_refused_is_retried_then_fails_with_the_attempt_count():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", timeout_s=5, max_retries=2, backoff_s=0.001,
                        max_backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(ChatClientError) as err:
        client.post(BODY)
    e = err.value
    assert e.attempts == 3 and e.status is None and time.monotonic() - start < 5
    assert str(e).startswith(f"POST http://127.0.0.1:{port}/v1/chat/completions: cannot reach the server (")
    assert "refused" in str(e).lower() and str(e).endswith("(after 3 attempt(s))")


def test_timeout_is_retried():
    with Scripted([_json(200, OK)]) as srv:
        handler = srv.server.RequestHandlerClass
        do_post = handler.do_POST
        calls = {"n": 0}

        def slow_once(self):
            calls["n"] += 1
            if calls["n"] == 1:  # no answer in time: the client gives up on this one
                time.sleep(0.5)
                return
            do_post(self)

        handler.do_POST = slow_once
        assert srv.client(timeout_s=0.2).post(BODY) == OK
    assert calls["n"] == 2


def test_bearer_header_only_when_a_key_is_set(client_kind):
    with Scripted([_json(200, OK)] * 3) as srv:
        srv.client(api_key="sk-test").post(BODY)
        srv.client(api_key=None).post(BODY)
        srv.client(api_key="").post(BODY)
    headers = [{k.lower(): v for k, v in r[1].items()} for r in srv.requests]
    assert headers[0]["authorization"] == "Bearer sk-test"
    if client_kind == "stdlib":
        assert "authorization" not in headers[1] and "authorization" not in headers[2]
    else:  # the SDK always sends a key: the placeholder vLLM's docs use for servers without auth
        assert headers[1]["authorization"] == headers[2]["authorization"] == "Bearer EMPTY"
    assert all(h["content-type"] == "application/json" for h in headers)


def test_environment_defaults(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert openai_env() == (DEFAULT_BASE_URL, None) == ("https://api.openai.com/v1", None)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    client = ChatClient.from_env(max_retries=1)
    assert client.url == "http://127.0.0.1:9/v1/chat/completions" and client.api_key == "k"
    assert openai_env("http://h/v1", "") == ("http://h/v1", None)  # an explicit empty key sends none


def test_message_text():
    assert message_text({"content": "a"}) == "a" and message_text({"content": None}) == ""
    assert message_text({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == "ab"


def test_memact_util_imports_nothing_else_of_memact():
    import ast
    import pathlib

    import memact.util

    for path in pathlib.Path(memact.util.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert not name.startswith("memact") or name.startswith("memact.util"), (path.name, name)

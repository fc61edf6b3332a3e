"""`memact serve` against hostile and careless clients (issue 21, items 4 and 7).

Every field a client may send is honoured or refused with a 400 naming it; every method and
route gets a JSON answer; the listen backlog takes 64 simultaneous connections without a
reset; a stalled client is dropped after the socket timeout; and a fuzz of request bodies,
in process and over HTTP, gets only 2xx/4xx answers. Each fuzz test prints its counts.
"""

import json
import socket
import threading
import time
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import FixedEngine, Served, _post

from memact.engines.base import SamplingParams
from memact.engines.hf import _next_tokens
from memact.engines.serve import ChatBackend, RequestError, make_server
from memact.models.chatml import call_text

TEXT = "alpha beta gamma delta epsilon"
OK = {"model": "fixed", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def fixed(tokenizer):
    backend = ChatBackend(FixedEngine(tokenizer, TEXT), tokenizer, "fixed")
    with Served(backend) as srv:
        yield srv


def _raw(port, data, timeout=10.0):
    """Send raw bytes (then close our side), read until the server closes; (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}  # case-blind
    return int(lines[0].split()[1]), headers, body


# ----------------------------------------------------------------------------- fields


@pytest.mark.parametrize("extra, needle", [
    ({"seed": 1 << 63}, "'seed' must be a 64-bit integer"),
    ({"seed": -(1 << 63) - 1}, "'seed' must be a 64-bit integer"),
    ({"seed": 10 ** 400}, "'seed' must be a 64-bit integer"),
    ({"logprobs": True}, "'logprobs'"),
    ({"top_logprobs": 3}, "'logprobs'"),
    ({"response_format": {"type": "json_object"}}, "'response_format'"),
    ({"tool_choice": "required"}, "'tool_choice'"),
    ({"tool_choice": {"type": "function", "function": {"name": "search"}}}, "'tool_choice'"),
    ({"temprature": 0.5}, "unknown field(s) 'temprature'"),
    ({"stop": 5}, "'stop'"),
    ({"stop": [""]}, "'stop'"),
    ({"stop": ["a"] * 17}, "'stop'"),
    ({"presence_penalty": 0.5}, "'presence_penalty'"),
    ({"logit_bias": {"5": 10}}, "'logit_bias'"),
    ({"parallel_tool_calls": False}, "'parallel_tool_calls'"),
    ({"stream": "no"}, "'stream'"),
    ({"temperature": float("nan")}, "'temperature'"),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "lone UTF-16 surrogate"),
    ({"tools": [{"type": "function", "function": {"name": "\udfff"}}]}, "lone UTF-16 surrogate"),
])
def test_a_field_the_server_cannot_honour_is_a_400_naming_it(fixed, extra, needle):
    body = {**OK, **extra}
    code, reply = _post(fixed.url, None, json.dumps(body).encode())  # json escapes the surrogates
    assert code == 400, reply
    assert needle in reply["error"]["message"], reply
    assert fixed.backend._batcher.engine.calls == 0


@pytest.mark.parametrize("extra", [
    {"seed": (1 << 63) - 1}, {"seed": -(1 << 63)}, {"logprobs": False}, {"response_format": {"type": "text"}},
    {"tool_choice": "auto"}, {"presence_penalty": 0}, {"frequency_penalty": 0.0}, {"logit_bias": {}},
    {"parallel_tool_calls": True}, {"user": "me"}, {"stream": False}, {"stop": None}, {"stop": []},
])
def test_no_op_values_of_known_fields_are_accepted(fixed, extra):
    code, reply = _post(fixed.url, {**OK, **extra})
    assert code == 200, reply
    assert reply["choices"][0]["message"]["content"] == TEXT


def test_stop_cuts_the_reply_before_the_first_stop_string(fixed, tokenizer):
    code, reply = _post(fixed.url, {**OK, "stop": ["delta", "gamma", "zzz"]})
    assert code == 200, reply
    assert reply["choices"][0]["message"]["content"] == "alpha beta "
    assert reply["choices"][0]["finish_reason"] == "stop"
    n = reply["usage"]["completion_tokens"]
    ids = fixed.backend._batcher.engine.ids
    assert "gamma" in tokenizer.decode(ids[:n]) and "gamma" not in tokenizer.decode(ids[:n - 1])
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + n
    code, reply = _post(fixed.url, {**OK, "stop": "zzz"})
    assert reply["choices"][0]["message"]["content"] == TEXT
    assert reply["usage"]["completion_tokens"] == len(ids)


def test_tool_choice_none_returns_the_call_as_text(tokenizer):
    text = call_text("search", {"query": "Alde"})
    backend = ChatBackend(FixedEngine(tokenizer, text), tokenizer, "fixed")
    with Served(backend) as srv:
        _, auto = _post(srv.url, OK)
        _, none = _post(srv.url, {**OK, "tool_choice": "none"})
    assert auto["choices"][0]["finish_reason"] == "tool_calls"
    assert auto["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "search"
    assert none["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in none["choices"][0]["message"]
    assert none["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 9.9e-6])
def test_a_vanishing_temperature_is_greedy_not_nan(temperature):
    logits = torch.randn(4, 50) * 20
    sampling = SamplingParams(temperature=temperature)
    ids, logp = _next_tokens(logits, sampling, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(ids, logits.argmax(-1))
    assert torch.isfinite(logp).all() and sampling.logprob_temperature == 1.0
    assert not SamplingParams(temperature=1e-5).greedy


def test_a_vanishing_temperature_through_the_server_is_greedy(tiny_model_dir):
    from memact.agent.cli_serve import load_backend

    backend = load_backend(str(tiny_model_dir), served_model_name="tiny")
    with Served(backend) as srv:
        body = {"model": "tiny", "messages": OK["messages"], "max_tokens": 6}
        code, tiny = _post(srv.url, {**body, "temperature": 1e-45})
        _, greedy = _post(srv.url, {**body, "temperature": 0})
    assert code == 200, tiny
    assert tiny["choices"][0]["message"] == greedy["choices"][0]["message"]


# ----------------------------------------------------------------------------- methods, routes, headers


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "PATCH", "GET", "HEAD", "TRACE"])
def test_a_wrong_method_is_a_json_405_with_allow(fixed, method):
    port = fixed.server.server_address[1]
    code, headers, body = _raw(port, f"{method} /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                     "Content-Length: 0\r\n\r\n".encode())
    assert code == 405 and headers["allow"] == "POST" and headers["content-type"] == "application/json"
    if method != "HEAD":
        assert "use POST" in json.loads(body)["error"]["message"]
    code, headers, body = _raw(port, b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert code == 405 and headers["allow"] == "GET"


@pytest.mark.parametrize("request_bytes, status", [
    (b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405),  # any token is a method; GET is this route's
    (b"GET /v1/models HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"GET / x HTTP/1.1\r\n\r\n", 400),  # a broken request line
    (b"GET /v1/models HTTQ/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 400),  # over the parser's 16 KiB for line and headers
    (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", (400, 414)),  # 414 if it came in one read
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX: " + b"b" * 70000 + b"\r\n\r\n", (400, 431)),
    (b"DELETE /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # TLS to a plain-HTTP port
])
def test_http_level_errors_are_json(fixed, request_bytes, status):
    code, headers, body = _raw(fixed.server.server_address[1], request_bytes)
    assert code in (status if isinstance(status, tuple) else (status,)) and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == code


@pytest.mark.parametrize("length, status", [
    ("\u00b2".encode("latin-1"), 400),  # "²": str.isdigit() is True, int() raises
    ("\u0661".encode("utf-8"), 400),  # ARABIC-INDIC DIGIT ONE, sent as UTF-8 bytes
    (b"-5", 400), (b"1e3", 400), (b"0x10", 400), (b"99999999999999999999", 413),
    (b"20000000", 413), (None, 411),
])
def test_a_bad_content_length_is_a_4xx(fixed, length, status):
    body = json.dumps(OK).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    if length is not None:
        head += b"Content-Length: " + length + b"\r\n"
    code, headers, reply = _raw(fixed.server.server_address[1], head + b"\r\n" + body)
    assert code == status, reply
    assert json.loads(reply)["error"]["message"]


def test_a_body_shorter_than_its_content_length_is_a_400(tokenizer):
    backend = ChatBackend(FixedEngine(tokenizer, TEXT), tokenizer, "fixed")
    server = make_server(backend, "127.0.0.1", 0, timeout=1.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, _, reply = _raw(server.server_address[1],
                              b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
        assert code == 400 and "before the end of the body (Content-Length 100)" in json.loads(reply)["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()
        backend.close()


def test_bad_backlog_and_timeout_are_refused(tokenizer):
    backend = ChatBackend(FixedEngine(tokenizer, TEXT), tokenizer, "fixed")
    try:
        for kwargs in ({"backlog": 0}, {"backlog": 1.5}, {"timeout": 0}, {"timeout": float("inf")},
                       {"timeout": float("nan")}):
            with pytest.raises(ValueError, match=next(iter(kwargs))):
                make_server(backend, "127.0.0.1", 0, **kwargs)
    finally:
        backend.close()


# ----------------------------------------------------------------------------- load and slow clients


def test_64_simultaneous_connections_get_answers_and_no_resets(fixed, capsys):
    """At 86dbe88 (backlog 5) 36 of 192 such connections waited out a 30 s client timeout."""
    port, n, rounds = fixed.server.server_address[1], 64, 3
    body = json.dumps(OK).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    outcomes: Counter = Counter()
    lock = threading.Lock()

    def client(barrier):
        barrier.wait()
        try:
            code, _, reply = _raw(port, request, timeout=20)
            what = "ok" if code == 200 and json.loads(reply)["choices"] else f"status {code}"
        except ConnectionResetError:
            what = "reset"
        except OSError as err:
            what = type(err).__name__
        with lock:
            outcomes[what] += 1

    start = time.monotonic()
    for _ in range(rounds):
        barrier = threading.Barrier(n)
        threads = [threading.Thread(target=client, args=(barrier,)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with capsys.disabled():
        print(f"\n[load] {n} simultaneous connections x {rounds} rounds: {dict(outcomes)} "
              f"in {time.monotonic() - start:.1f} s")
    assert outcomes == {"ok": n * rounds}


def test_stalled_clients_are_dropped_after_the_timeout(tokenizer):
    """At 86dbe88 there was no socket timeout: each stalled socket held a thread for ever. Now a
    client has ``timeout`` for its request line and headers (however it trickles them) and for each
    read of its body; then it gets a JSON 408 and the connection is closed."""
    backend = ChatBackend(FixedEngine(tokenizer, TEXT), tokenizer, "fixed")
    server = make_server(backend, "127.0.0.1", 0, timeout=0.5)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    socks = []
    try:
        for i in range(30):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            # half a request line, half the headers, or half a body
            s.sendall([b"POST /v1/chat", b"POST /v1/chat/completions HTTP/1.1\r\nHost:",
                       b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"mo"][i % 3])
            socks.append(s)
        trickle = socket.create_connection(("127.0.0.1", port), timeout=10)  # a byte every 0.2 s
        time.sleep(0.2)
        assert server.open_connections == 31  # each is being served
        start = time.monotonic()
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\n":
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
            if time.monotonic() - start > 3:
                break
        deadline = time.monotonic() + 10
        while server.open_connections and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.open_connections == 0, "stalled clients are still connected"
        replies = []
        for s in socks + [trickle]:
            data = b""
            try:
                while chunk := s.recv(65536):  # the server closed: recv returns b"" (no timeout raised)
                    data += chunk
            except ConnectionResetError:
                pass
            replies.append(data)
        assert all(r.startswith(b"HTTP/1.1 408 Request Timeout") for r in replies[:30]), replies
        assert all(json.loads(r.partition(b"\r\n\r\n")[2])["error"]["code"] == 408 for r in replies[:30])
        assert replies[30].startswith(b"HTTP/1.1 408"), "a trickling client is timed out too"
        code, reply = _post(f"http://127.0.0.1:{port}/v1", OK)  # and the server still serves
        assert code == 200, reply
    finally:
        for s in socks:
            s.close()
        server.shutdown()
        server.server_close()
        backend.close()


# ----------------------------------------------------------------------------- fuzz

ANY_CHAR = st.characters(blacklist_categories=())  # surrogates and control characters included
TEXT_ST = st.text(ANY_CHAR, max_size=40) | st.sampled_from(["\ud800", "\x00", "", "fixed", "user", "auto", "none"])
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**18, max_value=10**400)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT_ST)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT_ST, inner, max_size=4),
                    max_leaves=12)
FIELDS = ["model", "messages", "tools", "tool_choice", "temperature", "top_p", "max_tokens", "max_completion_tokens",
          "seed", "stop", "n", "stream", "response_format", "logprobs", "top_logprobs", "presence_penalty",
          "logit_bias", "parallel_tool_calls", "user", "stream_options"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]) | JSON},
                                optional={"content": JSON, "tool_calls": JSON | st.lists(st.fixed_dictionaries(
                                    {"function": st.fixed_dictionaries({"name": TEXT_ST, "arguments": TEXT_ST | JSON})}),
                                    max_size=2)})
PLAUSIBLE = {"temperature": st.floats(0, 2.5) | st.just(1e-45), "top_p": st.floats(0, 1.2), "seed": st.integers(),
             "max_tokens": st.integers(-2, 64), "stop": st.none() | TEXT_ST | st.lists(TEXT_ST, max_size=3),
             "tool_choice": st.sampled_from([None, "auto", "none", "required"]), "n": st.integers(0, 2),
             "logprobs": st.booleans(), "stream": st.booleans(),
             "stream_options": st.sampled_from([None, {"include_usage": True}, {"x": 1}]), "response_format": st.sampled_from([None, {"type": "text"}, {"type": "x"}]),
             "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
                 {"name": TEXT_ST})}), max_size=2)}
NEAR_VALID = st.fixed_dictionaries({"model": st.just("fixed"), "messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user"]), "content": TEXT_ST}), min_size=1, max_size=2)},
    optional=PLAUSIBLE)
BODY = NEAR_VALID | st.fixed_dictionaries({"model": st.just("fixed") | JSON,
                              "messages": st.lists(MESSAGE, min_size=1, max_size=3) | JSON},
                             optional={k: JSON for k in FIELDS[2:]}) | st.dictionaries(
    st.sampled_from(FIELDS) | TEXT_ST, JSON, max_size=6) | JSON
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


class Counts:
    def __init__(self, name):
        self.name, self.tried, self.refused, self.answered, self.raised = name, 0, 0, 0, 0
        self.examples = []

    def report(self, capsys):
        with capsys.disabled():
            print(f"\n[fuzz {self.name}] inputs tried {self.tried}, 4xx errors returned {self.refused}, "
                  f"answered {self.answered}, exceptions raised or 5xx {self.raised}")
        assert self.raised == 0, self.examples
        assert self.tried == self.refused + self.answered


def test_fuzz_request_bodies_in_process(tokenizer, capsys):
    backend = ChatBackend(FixedEngine(tokenizer, call_text("search", {"q": "x"}) + " tail"), tokenizer, "fixed")
    counts = Counts("request body -> ChatBackend.complete")

    @FUZZ
    @given(BODY)
    def run(body):
        counts.tried += 1
        try:
            reply = backend.complete(body)
            json.dumps(reply, ensure_ascii=False).encode("utf-8")  # a reply that can be sent
            counts.answered += 1
        except RequestError as err:
            if 400 <= err.status < 500 and err.message:
                counts.refused += 1
            else:
                counts.raised += 1
                counts.examples.append(f"{err.status}: {err.message[:100]}")
        except Exception as err:  # counted; report() asserts none escaped
            counts.raised += 1
            if len(counts.examples) < 5:
                counts.examples.append(f"{type(err).__name__}: {str(err)[:100]} for {body!r:.200}")

    try:
        run()
    finally:
        backend.close()
    counts.report(capsys)


def _encode(obj):
    try:
        return json.dumps(obj).encode()
    except (ValueError, OverflowError, RecursionError):
        return repr(obj).encode("utf-8", "surrogatepass")


HEADER_VALUE = st.binary(max_size=20) | st.sampled_from([b"\xc2\xb2", b"-1", b"", b"1e2", b" 5", b"5 "])


def test_fuzz_requests_over_http(fixed, capsys):
    port = fixed.server.server_address[1]
    counts = Counts("raw HTTP request -> memact serve")

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
    @given(BODY.map(_encode) | st.binary(max_size=200), st.sampled_from(["POST", "GET", "PUT", "OPTIONS"]),
           st.booleans(), HEADER_VALUE)
    def run(body, method, true_length, length):
        counts.tried += 1
        length = str(len(body)).encode() if true_length else length.replace(b"\r", b"").replace(b"\n", b"")
        request = (method.encode() + b" /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                   + b"\r\n\r\n" + body)
        try:
            code, headers, reply = _raw(port, request, timeout=20)
            if headers["content-type"] == "text/event-stream":  # a valid streamed request
                events = [e for e in reply.decode().split("\n\n") if e]
                assert code == 200 and events[-1] == "data: [DONE]"
                assert all(json.loads(e[len("data: "):])["object"] == "chat.completion.chunk" for e in events[:-1])
            else:
                assert headers["content-type"] == "application/json"
                assert json.loads(reply)["error" if code >= 400 else "choices"]
        except Exception as err:
            counts.raised += 1
            if len(counts.examples) < 5:
                counts.examples.append(f"{type(err).__name__}: {str(err)[:100]} for {request[:200]!r}")
            return
        if code < 300:
            counts.answered += 1
        elif 400 <= code < 500:
            counts.refused += 1
        else:
            counts.raised += 1
            counts.examples.append(f"{code}: {reply[:100]!r}")

    run()
    assert fixed.thread.is_alive()
    counts.report(capsys)

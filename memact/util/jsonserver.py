"""The one JSON-over-HTTP server of the project: `memact serve` (the OpenAI-compatible chat
server, ``memact.engines.serve``) and `memact retrieval-serve` (``memact.env.retrieval``).

An ASGI application (Starlette) served by uvicorn, the stack of ``vllm serve``. A server is a
route table, ``{path: (method, handler)}``: a handler is a plain blocking function that takes the
request body (parsed JSON for POST, None otherwise) and returns a JSON-able object, or a
:class:`Stream` whose events (any iterable, a generator included) are sent as server-sent
events as they are produced. Handlers run in a thread pool, so the event loop keeps accepting
while an engine generates.

What every route gets from here (docs/engines.md, "memact serve"): a listen backlog sized for many
simultaneous clients; a deadline for a request's line and headers (checked per connection, so a
client trickling a byte at a time is dropped too) and a per-read timeout for its body, each
answered with a JSON 408 and a close; a size limit on the body (``Content-Length`` or chunked);
a body that must be JSON (``memact.util.safejson``); 404 for an unknown path, 405 with ``Allow``
for a wrong method; malformed HTTP (the parser's errors) as a JSON 400; a :class:`RequestError`
as a 4xx JSON error naming what was wrong, a bug as a 500; the server keeps serving either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from memact.util.safejson import parse_json

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
DEFAULT_BACKLOG = 1024  # listen queue; Python's default of 5 reset clients at 50 connections
DEFAULT_TIMEOUT_S = 60.0  # for a request's line and headers, and per read of its body
KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this (uvicorn's default)
MAX_HEADER_BYTES = 16 << 10  # request line and headers (the parser's limit for a request still arriving)
STREAM_ERROR = "stream_error"

Routes = dict[str, tuple[str, Callable[[Any], Any]]]


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class Stream:
    """A reply sent as server-sent events (``data: {json}``), ended by ``data: [DONE]``.

    ``events`` is iterated in a worker thread and each event is sent as soon as it is produced.
    If the iteration raises once the reply has begun, the client gets one last event
    ``{"error": {"message", "type", "code": 500}}`` and then ``[DONE]``.
    """

    events: Iterable[Any]


def error_body(status: int, message: str, kind: str | None = None) -> bytes:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


# ----------------------------------------------------------------------------- the application


class _ClientGone(Exception):
    pass


class JSONApp:
    """The ASGI application of a route table (what uvicorn runs; it answers ``http`` scopes only,
    so an ASGI server must run it with lifespan off, as :class:`JSONServer` does)."""

    def __init__(self, routes: Routes, timeout: float = DEFAULT_TIMEOUT_S):
        self.routes = dict(routes)
        self.timeout = float(timeout)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        from starlette.requests import Request

        request = Request(scope, receive)
        try:
            response = await self._respond(request)
        except _ClientGone:
            return
        except RequestError as err:  # closed after: a body not read must not be parsed as the next request
            headers = {"connection": "close", **({"allow": err.allow} if isinstance(err, _MethodNotAllowed) else {})}
            response = _json(err.status, error_body(err.status, err.message, err.kind), headers)
        except Exception as err:  # a bug of ours: answer, log, keep serving
            log.exception("request failed")
            response = _json(500, error_body(500, f"internal error: {type(err).__name__}: {err}"),
                             {"connection": "close"})
        await response(scope, receive, send)

    async def _respond(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        if len(request.scope.get("raw_path", b"")) + len(request.scope.get("query_string", b"")) > MAX_HEADER_BYTES:
            raise RequestError(414, f"the request target is over {MAX_HEADER_BYTES} bytes")
        if sum(len(k) + len(v) + 4 for k, v in request.scope["headers"]) > MAX_HEADER_BYTES:
            raise RequestError(431, f"the request headers are over {MAX_HEADER_BYTES} bytes")
        path = request.url.path.rstrip("/")
        route = self.routes.get(path)
        if route is None:
            hint = ", ".join(f"{m} {p}" for p, (m, _) in self.routes.items())
            raise RequestError(404, f"no route {request.method} {request.url.path}; this server has {hint}",
                               "not_found")
        method, handler = route
        if request.method != method:
            raise _MethodNotAllowed(method, f"{request.method} {path} is not allowed; use {method}")
        body = await self._read_json(request) if method == "POST" else None
        result = await run_in_threadpool(handler, body)
        if isinstance(result, Stream):
            return _event_stream(result.events)
        return _json(200, json.dumps(result).encode())

    async def _read_json(self, request: Any) -> Any:
        """The body as JSON; the Content-Length digits are checked by the HTTP parser already."""
        length = request.headers.get("content-length")
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        if length is None and not chunked:
            raise RequestError(411, "a Content-Length header (or a chunked body) is required")
        if length is not None and int(length) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body of {int(length)} bytes is over the limit of {MAX_BODY_BYTES}")
        raw = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(request.receive(), self.timeout)
            except TimeoutError:
                raise RequestError(408, f"no data for {self.timeout:g} s: the request timed out") from None
            if message["type"] == "http.disconnect":
                raise _ClientGone
            raw += message.get("body", b"")
            if len(raw) > MAX_BODY_BYTES:
                raise RequestError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")
            if not message.get("more_body", False):
                break
        body, err = parse_json(bytes(raw))
        if err is not None:
            raise RequestError(400, f"the request body is not JSON ({err})")
        return body


class _MethodNotAllowed(RequestError):
    def __init__(self, allow: str, message: str):
        super().__init__(405, message)
        self.allow = allow


def _json(status: int, data: bytes, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response

    return Response(data, status, headers=headers, media_type="application/json")


def _event_stream(events: Iterable[Any]) -> Any:
    from starlette.concurrency import iterate_in_threadpool
    from starlette.responses import StreamingResponse

    async def frames():
        try:
            async for event in iterate_in_threadpool(iter(events)):
                yield b"data: " + json.dumps(event).encode() + b"\n\n"
        except Exception as err:  # the status line is gone already: the error is the last event
            log.exception("stream failed")
            yield b"data: " + error_body(500, f"{type(err).__name__}: {err}", STREAM_ERROR) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


# ----------------------------------------------------------------------------- the HTTP protocol


def _protocol_class(timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline for a request's line and headers, and its parser's
    400 as JSON."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        request_timeout = timeout

        def connection_made(self, transport: Any) -> None:
            self._stall: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._stall is None:
                self._stall = self.loop.call_later(self.request_timeout, self._stalled)

        def _disarm(self) -> None:
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing() or self._in_request():
                self._disarm()  # the application's per-read timeout covers the body
            else:
                self._arm()  # part of a request line or headers: the deadline runs from now (or earlier)

        def eof_received(self) -> bool:
            """The client closed its side (a half-close): a request cut short is a 400; one that is
            whole is still answered, and the connection closes after the reply."""
            import h11

            self._eof = True
            if self.transport.is_closing():
                return True
            if self._in_request():
                if self.conn.their_state is h11.SEND_BODY:
                    length = dict(self.headers).get(b"content-length", b"?").decode("latin-1")
                    self._reply_and_close(400, f"the client closed the connection before the end of the body "
                                               f"(Content-Length {length})")
            elif self.conn.trailing_data[0]:
                self._reply_and_close(400, "the client closed the connection in the middle of a request line "
                                           "or its headers")
            else:
                self.transport.close()
            return True  # keep the transport open for writing the reply

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if getattr(self, "_eof", False) and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _stalled(self) -> None:
            self._stall = None
            if self.transport.is_closing() or self._in_request():
                return
            self._reply_and_close(408, f"no complete request line and headers in {self.request_timeout:g} s: "
                                       "the request timed out")

        def send_400_response(self, msg: str) -> None:
            self._reply_and_close(400, f"malformed HTTP request: {msg}")

        def _reply_and_close(self, status: int, message: str) -> None:
            body = error_body(status, message)
            reason = {400: b"Bad Request", 408: b"Request Timeout"}[status]
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n" % (status, reason, len(body)) + body)
            self.transport.close()

    return Protocol


# ----------------------------------------------------------------------------- the server


class JSONServer:
    """A route table served by uvicorn on a socket bound at construction (``server_address``).

    ``serve_forever()`` blocks (in any thread); ``shutdown()`` stops it from another thread and
    waits; ``server_close()`` closes the socket. ``open_connections`` counts live connections.
    """

    def __init__(self, routes: Routes, host: str, port: int, *, backlog: int, timeout: float, name: str):
        import uvicorn

        self.app = JSONApp(routes, timeout)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(backlog)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(self.app, http=_protocol_class(timeout), backlog=backlog, log_config=None,
                                log_level="critical", access_log=False, lifespan="off", server_header=False,
                                headers=[("server", name)], timeout_keep_alive=min(KEEP_ALIVE_S, timeout),
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._done = threading.Event()
        self._done.set()

    @property
    def open_connections(self) -> int:
        return len(self._server.server_state.connections)

    def serve_forever(self) -> None:
        self._done.clear()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """From now on `kill PID` stops this process the way Ctrl-C does (a server loading a model
    calls it before the load)."""
    signal.signal(signal.SIGTERM, _interrupt)


def serve_until_stopped(server: JSONServer, cleanup: Callable[[], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM, then close the socket and run ``cleanup``."""
    stop_on_sigterm()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if cleanup is not None:
            cleanup()


def make_json_server(routes: Routes, host: str = "127.0.0.1", port: int = 0, *, backlog: int = DEFAULT_BACKLOG,
                     timeout: float = DEFAULT_TIMEOUT_S, name: str = "memact") -> JSONServer:
    """A server for ``routes`` (port 0 picks a free one: ``server.server_address``).

    ``backlog``: connections the kernel queues before the server accepts them (capped by
    ``net.core.somaxconn``). ``timeout``: seconds a client has for its request line and headers,
    and for each read of its body; past it the client gets a 408 and is dropped. ``name``: the
    ``Server`` header.
    """
    if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
        raise ValueError(f"backlog must be a positive integer, got {backlog!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return JSONServer(routes, host, port, backlog=backlog, timeout=float(timeout), name=name)

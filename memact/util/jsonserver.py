"""The one threaded JSON-over-HTTP server of the project: `memact serve` (the OpenAI-compatible chat
server, ``memact.engines.serve``) and `memact retrieval-serve` (``memact.env.retrieval``).

A server is a route table, ``{path: (method, handler)}``: a handler takes the request body
(parsed JSON for POST, None otherwise) and returns a JSON-able object, or a :class:`Stream` of
server-sent events. What every route gets from here (docs/engines.md, "Hardening"): a listen
backlog sized for many simultaneous clients; a socket timeout, so a client that stalls gets a
408 or is dropped and its thread ends; a Content-Length of ASCII digits, a size limit, a body
that must be JSON (``memact.util.safejson``); 404 for an unknown path, 405 with ``Allow`` for a
wrong method; http.server's own errors as JSON; a :class:`RequestError` as a 4xx JSON error
naming what was wrong, a bug as a 500; the server keeps serving either way.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from memact.util.safejson import parse_json

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
DEFAULT_BACKLOG = 1024  # listen queue; Python's default of 5 reset clients at 50 connections
DEFAULT_TIMEOUT_S = 60.0  # per socket read or write; a client silent this long is dropped
_CONTENT_LENGTH = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() takes "²" and "١"

Routes = dict[str, tuple[str, Callable[[Any], Any]]]


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class Stream:
    """A reply sent as server-sent events (``data: {json}``), ended by ``data: [DONE]``."""

    events: list[Any]


class _MethodNotAllowed(RequestError):
    def __init__(self, allow: str, message: str):
        super().__init__(405, message)
        self.allow = allow


class _Handler(BaseHTTPRequestHandler):
    routes: Routes  # set on the subclass made by make_json_server
    timeout = DEFAULT_TIMEOUT_S  # socket timeout (StreamRequestHandler sets it on the connection)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(data)

    def _error(self, err: RequestError, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._send(err.status, {"error": {"message": err.message, "type": err.kind, "code": err.status}}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, header too long, unknown method) as JSON, not HTML."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # not parsed yet: answer with a status line all the same
            self.request_version = "HTTP/1.0"
        short, long = self.responses.get(code, ("error", ""))
        text = "; ".join(x for x in (message or short, explain or long) if x)
        try:
            self._error(RequestError(code, text, "invalid_request_error" if code < 500 else "server_error"),
                        (("Connection", "close"),))
        except OSError:  # the client is gone
            pass

    def _route(self) -> None:
        """Dispatch any method: 404 for an unknown path, 405 (with ``Allow``) for a known one."""
        path = self.path.split("?", 1)[0].rstrip("/")
        route = self.routes.get(path)
        if route is None:
            hint = ", ".join(f"{m} {p}" for p, (m, _) in self.routes.items())
            raise RequestError(404, f"no route {self.command} {self.path}; this server has {hint}", "not_found")
        method, handler = route
        if self.command != method:
            raise _MethodNotAllowed(method, f"{self.command} {path} is not allowed; use {method}")
        result = handler(self._read_json() if method == "POST" else None)
        if isinstance(result, Stream):
            self._stream(result.events)
        else:
            self._send(200, result)

    def _stream(self, events: list[Any]) -> None:
        """Server-sent events, ended by ``data: [DONE]``; the connection closes after them."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for event in events:
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not _CONTENT_LENGTH.fullmatch(length.strip()):
            shown = "missing" if length is None else repr(length[:40])
            raise RequestError(411 if length is None else 400,
                               f"a Content-Length header of ASCII digits is required (got {shown}; chunked "
                               "bodies are not read)")
        n = int(length)
        if n > MAX_BODY_BYTES:
            raise RequestError(413, f"request body of {n} bytes is over the limit of {MAX_BODY_BYTES}")
        raw = self.rfile.read(n)
        if len(raw) < n:
            raise RequestError(400, f"the body ended after {len(raw)} of the {n} bytes of its Content-Length")
        body, err = parse_json(raw)
        if err is not None:
            raise RequestError(400, f"the request body is not JSON ({err})")
        return body

    def _handle(self) -> None:
        try:
            self._route()
        except _MethodNotAllowed as err:
            self._error(err, (("Allow", err.allow),))
        except RequestError as err:
            self._error(err)
        except TimeoutError:  # a client that stopped sending: drop it, free the thread
            self.close_connection = True
            log.debug("%s timed out after %ss", self.address_string(), self.timeout)
            try:
                self._error(RequestError(408, f"no data for {self.timeout} s: the request timed out"),
                            (("Connection", "close"),))
            except OSError:
                pass
        except OSError as err:  # the client went away while we answered
            self.close_connection = True
            log.debug("%s: %s", self.address_string(), err)
        except Exception as err:  # a bug of ours: answer, log, keep serving
            log.exception("request failed")
            self._error(RequestError(500, f"internal error: {type(err).__name__}: {err}", "server_error"))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, backlog: int):
        self.request_queue_size = backlog  # read by listen() in server_activate
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):  # a reset or broken pipe from a client is not our failure
            log.debug("%s: %s", client_address, err)
        else:
            log.exception("connection from %s failed", client_address)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """From now on `kill PID` stops this process the way Ctrl-C does (a server loading a model
    calls it before the load)."""
    signal.signal(signal.SIGTERM, _interrupt)


def serve_until_stopped(server: ThreadingHTTPServer, cleanup: Callable[[], None] | None = None) -> None:
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
                     timeout: float = DEFAULT_TIMEOUT_S, name: str = "memact") -> ThreadingHTTPServer:
    """A threaded HTTP server for ``routes`` (port 0 picks a free one: ``server.server_address``).

    ``backlog``: connections the kernel queues before the server accepts them (capped by
    ``net.core.somaxconn``). ``timeout``: seconds a socket read or write may wait; a client
    silent that long gets a 408 or is dropped, and its thread ends. ``name``: the ``Server`` header.
    """
    if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
        raise ValueError(f"backlog must be a positive integer, got {backlog!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    handler = type("Handler", (_Handler,), {"routes": dict(routes), "timeout": float(timeout), "server_version": name})
    return _Server((host, port), handler, backlog)

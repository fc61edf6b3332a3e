"""The project's HTTP clients, with one retry rule and one failure message.

:class:`OpenAIChatClient` speaks to OpenAI-compatible ``/chat/completions`` servers through the
official ``openai`` SDK: the OpenAI engine (``openai:MODEL`` policies), the LLM judge and the
research agent's proposers (``memact.research.endpoint``). :class:`ChatClient` POSTs a JSON body
to one endpoint with the standard library (``path``, default ``/chat/completions``): the retrieval
client (``memact.env.retrieval``, ``/retrieve``) uses it. A reply must be a JSON object. Failures are retried when another attempt may succeed (:data:`RETRY_STATUSES`,
timeouts, connection errors) with exponential backoff and jitter, honouring ``Retry-After`` up
to ``max_backoff_s``; every failure that is given up on raises :class:`ChatClientError`, e.g.
``POST http://127.0.0.1:8000/v1/chat/completions: HTTP 503: warming up (after 5 attempt(s))``.

Environment (declared here once): ``OPENAI_BASE_URL`` (default ``https://api.openai.com/v1``),
``OPENAI_API_KEY`` (sent as a bearer token when set).
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from memact.util.safejson import parse_json

BASE_URL_ENV = "OPENAI_BASE_URL"
API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"

# 408 timeout, 429 rate limit, 5xx but 501 (not implemented: it will not be next time). 409 is
# in: OpenAI answers it for a lock timeout on its side and its own client retries it, and a
# chat completion changes nothing on the server, so a second attempt cannot conflict with the first.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})

_DETAIL_CHARS = 500


def openai_env(base_url: str | None = None, api_key: str | None = None) -> tuple[str, str | None]:
    """``(base_url, api_key)``: the arguments where given, else ``$OPENAI_BASE_URL`` (else
    :data:`DEFAULT_BASE_URL`) and ``$OPENAI_API_KEY`` (else None)."""
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return base, key or None


class ChatClientError(RuntimeError):
    """A request given up on: ``POST {url}: {cause} (after {attempts} attempt(s))``.

    Attributes:
        url: the URL posted to.
        cause: what went wrong: ``HTTP {status}: {server's message}``, a network cause, or a reply
            we cannot use.
        status: the HTTP status of the last attempt, None when there was none.
        attempts: how many requests were made.
    """

    def __init__(self, url: str, cause: str, status: int | None = None, attempts: int = 1):
        super().__init__(f"POST {url}: {cause} (after {attempts} attempt(s))")
        self.url, self.cause, self.status, self.attempts = url, cause, status, attempts


class _Failure(Exception):
    """One failed attempt; ``retryable`` says whether another may succeed."""

    def __init__(self, cause: str, retryable: bool, status: int | None = None, retry_after: float | None = None):
        super().__init__(cause)
        self.retryable, self.status, self.retry_after = retryable, status, retry_after


@dataclass
class ChatClient:
    """POSTs chat-completion bodies to one OpenAI-compatible server.

    Attributes:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        api_key: sent as ``Authorization: Bearer ...`` when not empty.
        timeout_s: seconds to wait for one answer.
        max_retries: attempts after the first one, for a retryable status, a timeout or a
            connection error.
        backoff_s: the first retry's delay; doubles each retry, times a jitter in [0.5, 1),
            capped at ``max_backoff_s``. A ``Retry-After`` header lengthens it, to that cap too.
    """

    base_url: str
    api_key: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    path: str = "/chat/completions"
    """The endpoint under ``base_url`` (the retrieval client posts to ``/retrieve`` the same way)."""

    @classmethod
    def from_env(cls, base_url: str | None = None, api_key: str | None = None, **kwargs: Any) -> ChatClient:
        """A client for :func:`openai_env`'s base URL and key."""
        base, key = openai_env(base_url, api_key)
        return cls(base, key, **kwargs)

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}{self.path}"

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` with retries; the reply as a dict, else raises :class:`ChatClientError`."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempt = 0
        while True:
            try:
                return self._post_once(data, headers)
            except _Failure as err:
                if not err.retryable or attempt >= self.max_retries:
                    raise ChatClientError(self.url, str(err), err.status, attempt + 1) from None
                time.sleep(self.delay(attempt, err.retry_after))
                attempt += 1

    def complete(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """:meth:`post`, and the reply's first choice (a dict whose ``message`` is a dict)."""
        reply = self.post(body)
        return reply, self.first_choice(reply)

    def first_choice(self, reply: dict[str, Any]) -> dict[str, Any]:
        """``reply["choices"][0]``, checked to hold a ``message`` dict; else :class:`ChatClientError`."""
        return _first_choice(self.url, reply)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``attempt + 1`` (``attempt`` retries made so far)."""
        return _delay(self.backoff_s, self.max_backoff_s, attempt, retry_after)

    def _post_once(self, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            retry_after = _retry_after(err.headers.get("Retry-After") if err.headers else None)
            raise _Failure(f"HTTP {err.code}: {_error_detail(err)}", err.code in RETRY_STATUSES, err.code,
                           retry_after) from None
        except urllib.error.URLError as err:
            raise _Failure(f"cannot reach the server ({err.reason})", True) from None
        except TimeoutError:
            raise _Failure(f"no reply within {self.timeout_s:g} s", True) from None
        except (ConnectionError, http.client.HTTPException, OSError) as err:
            raise _Failure(f"connection failed ({type(err).__name__}: {err})", True) from None
        reply, err = parse_json(raw)
        if err is not None:
            raise _Failure(f"reply is not JSON ({err}): {raw[:120]!r}", False, 200)
        if not isinstance(reply, dict):
            raise _Failure(f"reply is not a JSON object: {raw[:120]!r}", False, 200)
        return reply


def _first_choice(url: str, reply: dict[str, Any]) -> dict[str, Any]:
    choices = reply.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise ChatClientError(url, f"reply has no choices[0].message: {json.dumps(reply)[:300]}")
    return choice


def _delay(backoff_s: float, max_backoff_s: float, attempt: int, retry_after: float | None) -> float:
    """``backoff_s`` doubled ``attempt`` times, times a jitter in [0.5, 1), capped at ``max_backoff_s``;
    a ``Retry-After`` lengthens it, to that cap too."""
    delay = min(max_backoff_s, backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
    if retry_after is not None:
        delay = max(delay, min(max_backoff_s, retry_after))
    return delay


def message_text(message: dict[str, Any]) -> str:
    """The text of a reply message's ``content``: a string, the joined text of content parts, or ''."""
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else str(content)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number of seconds or an HTTP date; None if neither."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # "-0000": UTC
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's error message: ``error.message`` (or ``error``) of a JSON body, else the body, else the reason."""
    try:
        body = err.read()
    except Exception:  # the body could not be read: the status line is the message
        body = b""
    obj, _ = parse_json(body)
    if isinstance(obj, dict):
        error = obj.get("error")
        msg = error.get("message") if isinstance(error, dict) else error
        return str(msg or obj)[:_DETAIL_CHARS]
    text = body.decode("utf-8", errors="replace").strip()
    if text:
        return text[:_DETAIL_CHARS]
    return err.reason if isinstance(err.reason, str) and err.reason else f"status {err.code}"


class OpenAIChatClient(ChatClient):
    """The chat-completions client of OpenAI-protocol servers, on the official ``openai`` SDK:
    the OpenAI engine (``openai:MODEL`` policies), the LLM judge and the research agent's
    proposers. A :class:`ChatClient` (its fields, ``from_env``, ``url``, ``complete``, ``delay``
    and :class:`ChatClientError` messages) whose ``post`` goes through the SDK, with this
    project's retry rule (:data:`RETRY_STATUSES`, timeouts and connection errors) and backoff
    (``backoff_s`` doubling with jitter, ``Retry-After`` honoured, both capped at
    ``max_backoff_s``) in the SDK's retry hooks. Fields that the SDK's ``create`` does not name (a
    server's own extensions) go in ``extra_body``.
    """

    @functools.cached_property
    def _sdk(self) -> Any:
        import openai

        policy = self

        class _SDK(openai.OpenAI):
            def _should_retry(self, response: Any) -> bool:
                header = response.headers.get("x-should-retry")
                if header in ("true", "false"):
                    return header == "true"
                return response.status_code in RETRY_STATUSES

            def _calculate_retry_timeout(self, remaining_retries: int, options: Any,
                                         response_headers: Any = None) -> float:
                attempt = max(policy.max_retries - remaining_retries, 0)
                value = response_headers.get("retry-after") if response_headers is not None else None
                return policy.delay(attempt, _retry_after(value))

        # No key: the SDK insists on one and sends it; "EMPTY" is vLLM's convention for servers
        # without auth (api.openai.com answers it with a 401 naming the key).
        return _SDK(base_url=self.base_url, api_key=self.api_key or "EMPTY", timeout=self.timeout_s,
                    max_retries=self.max_retries)

    @functools.cached_property
    def _known(self) -> frozenset[str]:
        """The body fields the SDK's ``create`` takes by name."""
        import inspect

        return frozenset(inspect.signature(self._sdk.chat.completions.create).parameters) - {
            "extra_body", "extra_headers", "extra_query", "timeout"}

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion with retries; the reply as a dict, else raises :class:`ChatClientError`."""
        import openai

        client = self._sdk
        known = {k: v for k, v in body.items() if k in self._known}
        extra = {k: v for k, v in body.items() if k not in self._known}
        try:
            reply = client.chat.completions.create(**known, **({"extra_body": extra} if extra else {}))
        except openai.APIStatusError as err:
            status = err.status_code
            attempts = self.max_retries + 1 if status in RETRY_STATUSES else 1
            raise ChatClientError(self.url, f"HTTP {status}: {_sdk_detail(err)}", status, attempts) from None
        except openai.APITimeoutError:
            raise ChatClientError(self.url, f"no reply within {self.timeout_s:g} s", None,
                                  self.max_retries + 1) from None
        except openai.APIConnectionError as err:
            cause = err.__cause__ or err
            raise ChatClientError(self.url, f"cannot reach the server ({type(cause).__name__}: {cause})", None,
                                  self.max_retries + 1) from None
        except openai.APIError as err:  # a reply the SDK cannot read
            raise ChatClientError(self.url, f"unusable reply ({type(err).__name__}: {str(err)[:200]})", 200) from None
        except ValueError as err:  # the body of a 200 is not JSON
            raise ChatClientError(self.url, f"reply is not JSON ({err})", 200) from None
        # What the server sent, field for field (a malformed reply is the caller's to refuse, quietly here).
        out = reply.to_dict(warnings=False) if hasattr(reply, "to_dict") else reply
        if not isinstance(out, dict):
            raise ChatClientError(self.url, f"reply is not a JSON object: {str(out)[:120]!r}", 200)
        return out

def _sdk_detail(err: Any) -> str:
    """The server's message of an SDK status error: ``error.message`` of a JSON body, else the body."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:_DETAIL_CHARS]
        return json.dumps(body)[:_DETAIL_CHARS]
    if body:
        return str(body)[:_DETAIL_CHARS]
    return str(getattr(err, "message", err))[:_DETAIL_CHARS]

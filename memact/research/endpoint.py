"""The one seam to language models: an OpenAI-compatible ``/chat/completions`` call.

Both the LLM proposer (``openai:MODEL``) and the trained memact policy (``policy:MODEL_DIR``,
served with ``memact serve MODEL_DIR``) are reached through it. The HTTP call is the project's
one OpenAI-protocol client, :class:`memact.util.http.OpenAIChatClient` (the official ``openai``
SDK, with the project's retry rule and backoff), which the OpenAI engine and the LLM judge use too.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from memact.util.http import ChatClientError, OpenAIChatClient, openai_env

POLICY_URL_ENV = "MEMACT_POLICY_URL"


class EndpointError(ChatClientError):
    """The endpoint could not be reached or gave an answer we cannot use."""


class PolicyUnavailable(RuntimeError):
    """``policy:MODEL_DIR`` was asked for but no served policy is configured."""


@dataclass
class Endpoint:
    """Where and how to call a chat model.

    Attributes:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` (``/chat/completions`` is appended).
        model: the model name sent in each request.
        api_key: sent as a bearer token when not empty.
        timeout_s: seconds to wait for one HTTP answer.
        retries: extra attempts after a network error or a retryable HTTP status
            (``memact.util.http.RETRY_STATUSES``).
        backoff_s: the first retry's delay in seconds, doubled each retry (jittered), capped at
            ``max_backoff_s``; a ``Retry-After`` header is honoured up to that cap.
    """

    base_url: str
    model: str
    api_key: str = ""
    timeout_s: float = 180.0
    retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 8.0

    @classmethod
    def openai(cls, model: str) -> Endpoint:
        """The endpoint for ``openai:MODEL``: OPENAI_BASE_URL (default api.openai.com) and OPENAI_API_KEY."""
        if not model:
            raise ValueError("openai:MODEL needs a model name, e.g. openai:gpt-4o-mini")
        base, key = openai_env()
        return cls(base_url=base, model=model, api_key=key or "")

    @classmethod
    def policy(cls, model_dir: str) -> Endpoint:
        """The endpoint for ``policy:MODEL_DIR``: a served policy at MEMACT_POLICY_URL.

        The policy engine is not called in-process (yet): serve the model and point this
        variable at it. Raises PolicyUnavailable with those instructions otherwise.
        """
        url = os.environ.get(POLICY_URL_ENV, "")
        if not url:
            raise PolicyUnavailable(
                f"policy:{model_dir} needs a served policy: run `memact serve {model_dir}` and set "
                f"{POLICY_URL_ENV} to its OpenAI-compatible URL (e.g. http://127.0.0.1:8000/v1)"
            )
        return cls(base_url=url, model=model_dir, api_key=os.environ.get("MEMACT_POLICY_KEY", ""))

    @functools.cached_property
    def _client(self) -> OpenAIChatClient:
        """One SDK client per endpoint (its connection pool is reused from one call to the next)."""
        return OpenAIChatClient(self.base_url, self.api_key, timeout_s=self.timeout_s, max_retries=self.retries,
                                backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s)

    def chat(self, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """POST a chat completion and return the first choice's ``message`` dict.

        Network errors and retryable statuses are retried with exponential backoff; other HTTP
        errors fail at once. Raises :class:`EndpointError` naming the URL, the cause (with the
        server's message) and the attempts made.
        """
        client = self._client
        try:
            _, choice = client.complete({"model": self.model, "messages": messages, **extra})
        except ChatClientError as err:
            raise EndpointError(err.url, err.cause, err.status, err.attempts) from None
        except (RecursionError, ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
            # A reply the client could not take apart (e.g. JSON nested deeper than the parser
            # recurses): the endpoint's fault, reported like any other unusable reply.
            raise EndpointError(client.url, f"unusable reply ({type(err).__name__}: {str(err)[:200]})") from None
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise EndpointError(client.url, "reply has no choices[0].message object")
        return message

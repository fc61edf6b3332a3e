"""The one seam to language models: an OpenAI-compatible ``/chat/completions`` call.

Both the LLM proposer (``openai:MODEL``) and the trained memact policy (``policy:MODEL_DIR``,
served with ``memact serve MODEL_DIR``) are reached through it, with the standard library
only: no client package to install on a research machine.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

POLICY_URL_ENV = "MEMACT_POLICY_URL"
RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
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
        retries: extra attempts after a network error or a retryable HTTP status.
    """

    base_url: str
    model: str
    api_key: str = ""
    timeout_s: float = 180.0
    retries: int = 3

    @classmethod
    def openai(cls, model: str) -> Endpoint:
        """The endpoint for ``openai:MODEL``: OPENAI_BASE_URL (default api.openai.com) and OPENAI_API_KEY."""
        if not model:
            raise ValueError("openai:MODEL needs a model name, e.g. openai:gpt-4o-mini")
        base = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
        return cls(base_url=base, model=model, api_key=os.environ.get("OPENAI_API_KEY", ""))

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

    def chat(self, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """POST a chat completion and return the first choice's ``message`` dict.

        Network errors and retryable statuses (429, 5xx) are retried with exponential
        backoff (1, 2, 4 s ...); other HTTP errors fail at once with the server's message.
        """
        body = json.dumps({"model": self.model, "messages": messages, **extra}).encode()
        url = self.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(2 ** (attempt - 1))
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    answer = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", errors="replace")[:300]
                last_error = f"HTTP {err.code} from {url}: {detail}"
                if err.code in RETRY_STATUSES:
                    continue
                raise EndpointError(last_error) from err
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last_error = f"cannot reach {url}: {getattr(err, 'reason', err)}"
                continue
            except json.JSONDecodeError as err:
                raise EndpointError(f"{url} answered with something that is not JSON: {err}") from err
            try:
                return answer["choices"][0]["message"]
            except (KeyError, IndexError, TypeError) as err:
                raise EndpointError(f"{url} answered without choices[0].message: {str(answer)[:300]}") from err
        raise EndpointError(f"{last_error} (gave up after {self.retries + 1} attempts)")

"""Loopback helpers for the `memact serve` tests: a server in a thread, a recording engine, a POST.

A module with a unique name rather than conftest.py, so that `from serve_helpers import ...`
finds it whichever test folders pytest collects together.
"""

import json
import threading
import urllib.error
import urllib.request

from memact.agent.scripted import ScriptedExpert
from memact.engines.base import Generation
from memact.engines.scripted import ScriptedEngine
from memact.engines.serve import ChatBackend, make_server
from memact.models.chatml import IM_END


class Served:
    """A server for ``backend`` in a thread on a free loopback port."""

    def __init__(self, backend: ChatBackend):
        self.backend = backend
        self.server = make_server(backend, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.stopped = False

    def stop(self):
        if not self.stopped:
            self.stopped = True
            self.server.shutdown()
            self.server.server_close()
            self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Recording:
    """Wraps an engine: records the prompts it was given, runs a hook after each call."""

    def __init__(self, engine, after=None):
        self.engine, self.after, self.prompts = engine, after, []

    def generate(self, prompts, sampling):
        self.prompts.extend(prompts)
        out = self.engine.generate(prompts, sampling)
        if self.after:
            self.after(len(self.prompts))
        return out


def _scripted_backend(tasks, tok, seed, after=None):
    engine = Recording(ScriptedEngine(ScriptedExpert(tasks, memory=True, seed=seed), tok), after)
    return ChatBackend(engine, tok, "scripted"), engine


def _post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class FixedEngine:
    """Answers every prompt with the same text (and the end-of-turn token)."""

    def __init__(self, tok, text):
        self.ids = list(tok.encode(text, add_special_tokens=False)) + [tok.convert_tokens_to_ids(IM_END)]
        self.calls = 0

    def generate(self, prompts, sampling):
        self.calls += len(prompts)
        return [Generation(list(self.ids), [0.0] * len(self.ids)) for _ in prompts]

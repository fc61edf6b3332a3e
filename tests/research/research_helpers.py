"""Helpers of the research tests: a fast stub train.py (no torch), workspaces, a scripted proposer.

A module with a unique name rather than conftest.py, so that `from research_helpers import ...`
cannot pick up another test folder's conftest."""

from __future__ import annotations

import json
import os

from memact.research import workspace as ws
from memact.research.proposers import Proposal

# A deterministic stand-in for train.py: val_bpb is best at LEARNING_RATE 0.004 and grows
# a little with DEPTH. STUB_SLEEP lets a test catch it mid-run.
STUB_TRAIN = '''\
"""Stub train.py for tests."""
import math
import json
import os
import time

LEARNING_RATE = 0.001  # peak learning rate
WIDTH = 64  # multiple of N_HEADS
DEPTH = 2  # blocks
N_HEADS = 4  # heads
BATCH_SIZE = 16  # sequences per step
WARMUP_STEPS = 10  # steps
STUB_SLEEP = 0.0  # seconds

marker = os.environ.get("STUB_MARKER")
if marker:
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\\n")
time.sleep(STUB_SLEEP)
assert float(os.environ["MEMACT_BUDGET_S"]) > 0
val = 3.0 + abs(math.log(LEARNING_RATE / 0.004)) + 0.01 * DEPTH
print("training log line")
print("---")
print(f"val_bpb: {val:.6f}")
print("peak_memory_mb: 10.0")
'''


def make_workspace(directory, train_source: str = STUB_TRAIN) -> str:
    """A cpu-template workspace whose train.py is ``train_source``, committed; returns its path."""
    path = str(directory)
    ws.init_workspace(path, "cpu")
    ws.write_file(path, train_source)
    ws.commit_file(path, ws.EDITABLE_FILE, "stub train.py")
    return path


class ScriptedProposer:
    """Returns the given proposals in order (then repeats the last one)."""

    def __init__(self, proposals: list[Proposal]):
        self.proposals = proposals
        self.contexts: list[str] = []

    def propose(self, context_text: str, best_source: str, experiment: int) -> Proposal:
        self.contexts.append(context_text)
        return self.proposals[min(experiment - 1, len(self.proposals) - 1)]


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its new parent) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class CannedServer:
    """A loopback server answering each POST with the next of ``replies``; a context manager.

    A reply is ``bytes`` (200 with that body), ``(status, obj)`` (obj sent as JSON) or
    :class:`Cut` (a body shorter than its Content-Length: the connection closes mid-reply).
    """

    def __init__(self, replies: list | None = None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.replies = replies if replies is not None else []
        queue = self.replies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers["Content-Length"]))
                reply = queue.pop(0)
                status, body = (200, reply) if isinstance(reply, (bytes, Cut)) else (reply[0], json.dumps(reply[1]).encode())
                declared = len(body) * (2 if isinstance(body, Cut) else 1)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                self.wfile.write(bytes(body))
                self.close_connection = isinstance(body, Cut)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> CannedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class Cut(bytes):
    """A reply body the server cuts short (sent with twice its length as Content-Length)."""


def chat_reply(message) -> bytes:
    """A chat-completions body holding ``message`` as it is (a string too: a malformed reply)."""
    return json.dumps({"choices": [{"message": message}]}).encode()

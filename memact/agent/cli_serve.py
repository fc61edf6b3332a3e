"""`memact serve`: an OpenAI-compatible chat server over a model directory or the scripted expert."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from memact.models.model import DTYPES

if TYPE_CHECKING:
    from memact.engines.serve import ChatBackend


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model (or the scripted expert) through an OpenAI-compatible chat API",
        description="Serve GET /v1/models and POST /v1/chat/completions (tools, tool_calls, usage) on "
        "HOST:PORT with the HF engine, for evaluation and for `--policy openai:MODEL` rollouts "
        "(OPENAI_BASE_URL=http://HOST:PORT/v1). On GPUs, `vllm serve MODEL_DIR --enable-auto-tool-choice "
        "--tool-call-parser hermes` does the same job faster.",
    )
    p.add_argument("model", metavar="MODEL_DIR",
                   help="model directory, or 'scripted' / 'scripted-plan' / 'scripted-nomem' (the expert, for "
                   "the tasks of --objectives/--n/--seed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as 'model' (default: MODEL_DIR as given)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype")
    p.add_argument("--max-batch-size", type=int, default=32, help="most requests in one engine call")
    p.add_argument("--backlog", type=int, default=1024,
                   help="connections the kernel queues before they are accepted (default 1024; capped by "
                   "net.core.somaxconn)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a client has for its request line and headers, and for each read of its body, "
                   "before it gets a 408 and is dropped (default 60)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for the scripted expert")
    p.add_argument("--objectives", "-k", type=int, default=2, help="scripted: sub-questions per task")
    p.add_argument("--n", type=int, default=16, help="scripted: number of tasks")
    p.add_argument("--seed", type=int, default=0, help="scripted: task seed")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="scripted: the task source the expert answers for (default synthetic; history:FILE "
                        "serves the history expert, the research agent's --memory policy:scripted)")
    p.set_defaults(func=run)


def build_server(args: argparse.Namespace):
    from memact.engines.serve import make_server

    if args.backlog < 1:
        raise SystemExit(f"memact serve: --backlog must be at least 1, got {args.backlog}")
    if not 0 < args.timeout < float("inf"):
        raise SystemExit(f"memact serve: --timeout must be a positive number of seconds, got {args.timeout}")

    backend = load_backend(args.model, served_model_name=args.served_model_name, dtype=args.dtype,
                           max_batch_size=args.max_batch_size, tokenizer_dir=args.tokenizer,
                           objectives=args.objectives, n=args.n, seed=args.seed, data=args.data)
    return make_server(backend, args.host, args.port, backlog=args.backlog, timeout=args.timeout)


def run(args: argparse.Namespace) -> int:
    from memact.util.jsonserver import serve_until_stopped, stop_on_sigterm

    stop_on_sigterm()
    server = build_server(args)
    host, port = server.server_address[:2]
    print(f"serving {server.backend.model_name!r} on http://{host}:{port}/v1 "
          f"(OPENAI_BASE_URL=http://{host}:{port}/v1); Ctrl-C or SIGTERM stops", file=sys.stderr)
    serve_until_stopped(server, server.backend.close)
    print("stopped", file=sys.stderr)
    return 0


def load_backend(model: str, *, served_model_name: str | None = None, dtype: str = "float32",
                 max_batch_size: int = 32, tokenizer_dir: str | None = None, objectives: int = 2, n: int = 16,
                 seed: int = 0, data: str | None = None) -> ChatBackend:
    """A backend for ``memact serve MODEL``: a model directory (HF engine) or a scripted expert."""
    from memact.agent.scripted import SCRIPTED
    from memact.engines.serve import ChatBackend

    if model in SCRIPTED:
        from memact.agent.rollout import default_tokenizer
        from memact.agent.scripted import scripted_expert
        from memact.engines.scripted import ScriptedEngine
        from memact.env.sources import parse_source
        from memact.models.model import load_tokenizer

        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else default_tokenizer()
        try:
            tasks = parse_source(data).tasks(n, objectives, seed)
        except (ValueError, OSError) as err:
            raise SystemExit(f"memact serve: --data {data!r}: {err}") from None
        expert = scripted_expert(model, tasks, seed=seed)
        return ChatBackend(ScriptedEngine(expert, tok), tok, served_model_name or model,
                           max_batch_size=max_batch_size)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise SystemExit(f"memact serve {model!r}: not a model directory (no config.json), 'scripted', "
                         "'scripted-plan' or 'scripted-nomem'")

    from memact.engines.factory import build_engine
    from memact.models.model import load_policy, torch_dtype

    if dtype not in DTYPES:
        raise SystemExit(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    model_obj, tok = load_policy(path, dtype=torch_dtype(dtype))
    engine = build_engine("hf", model_obj, tok, max_batch_size=max_batch_size)
    max_context = getattr(model_obj.config, "max_position_embeddings", None)
    return ChatBackend(engine, tok, served_model_name or str(model), max_context=max_context,
                       max_batch_size=max_batch_size)

"""`memact index` (a corpus-level bm25s index, built once) and `memact retrieval-serve` (that index
behind a Search-R1-format HTTP server on loopback): the ``index:DIR`` and ``http:URL`` retrieval
backends of ``memact.env.retrieval``."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    from memact.env.sources import SPEC_HELP

    p = sub.add_parser(
        "index", help="build a corpus-level bm25s search index, saved for --retrieval index:DIR",
        description="Index the documents of a data file (every row's, as the task backend searches them) or a "
        "corpus JSONL of {\"title\", \"text\"} or {\"contents\"} lines with bm25s, and save it to OUT for "
        "`--retrieval index:OUT` and `memact retrieval-serve --index OUT`.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help=f"a data file source ({SPEC_HELP}; a file one)")
    src.add_argument("--corpus", help="a JSONL corpus: one {\"title\", \"text\"} or {\"contents\"} object a line")
    p.add_argument("--out", required=True, help="index directory")
    p.set_defaults(func=run_index)

    s = sub.add_parser(
        "retrieval-serve", help="serve an index over HTTP in the Search-R1 retrieval format",
        description="POST /retrieve {\"queries\": [...], \"topk\": k, \"return_scores\": bool} -> "
        "{\"result\": [[{\"contents\": ...}, ...], ...]}; GET /health. For --retrieval http://HOST:PORT.",
    )
    s.add_argument("--index", required=True, help="an index directory written by `memact index`")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    s.add_argument("--port", type=int, default=8001, help="port (default 8001; 0 picks a free one)")
    s.set_defaults(func=run_serve)


def read_corpus(path: str) -> list[str]:
    """The documents of a corpus JSONL, ``"Title: text"`` (as file sources build them) or ``contents``."""
    import json

    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"memact index: {path}: line {n}: not valid JSON ({err})") from None
            if isinstance(row, dict) and isinstance(row.get("contents"), str):
                docs.append(row["contents"])
            elif isinstance(row, dict) and isinstance(row.get("title"), str) and isinstance(row.get("text"), str):
                docs.append(f"{row['title']}: {row['text']}")
            else:
                raise SystemExit(f"memact index: {path}: line {n}: expected an object with 'contents' or with "
                                 "'title' and 'text' strings")
    if not docs:
        raise SystemExit(f"memact index: {path}: no documents")
    return docs


def run_index(args: argparse.Namespace) -> int:
    from memact.env.retrieval import build_index
    from memact.env.sources import build_corpus, parse_source

    t0 = time.time()
    if args.data:
        try:
            source = parse_source(args.data)
            docs = build_corpus(source.questions("all"))
        except (ValueError, OSError) as err:
            raise SystemExit(f"memact index: --data {args.data!r}: {err}") from None
    else:
        docs = read_corpus(args.corpus)
    out = build_index(docs, args.out)
    print(f"indexed {len(docs)} documents in {time.time() - t0:.1f}s -> {out}", file=sys.stderr)
    return 0


def make_retrieval_server(index_dir: str, host: str = "127.0.0.1", port: int = 8001):
    """A threaded server of ``memact.env.retrieval.retrieval_routes`` over a saved index."""
    from memact.env.retrieval import CorpusIndex, retrieval_routes
    from memact.util.jsonserver import make_json_server

    return make_json_server(retrieval_routes(CorpusIndex(index_dir)), host, port, name="memact-retrieval")


def run_serve(args: argparse.Namespace) -> int:
    from memact.util.jsonserver import serve_until_stopped

    try:
        server = make_retrieval_server(args.index, args.host, args.port)
    except FileNotFoundError as err:
        raise SystemExit(f"memact retrieval-serve: {err}") from None
    host, port = server.server_address[:2]
    print(f"serving {args.index} on http://{host}:{port}/retrieve (Ctrl-C or SIGTERM stops)", file=sys.stderr,
          flush=True)
    serve_until_stopped(server)
    return 0

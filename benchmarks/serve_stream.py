"""Time to the first streamed content against the whole reply, through `memact serve` with the
official `openai` client (the latency streaming exists for).

    .venv/bin/python benchmarks/serve_stream.py --model runs/smollm2 --max-tokens 64 --repeats 3

The server runs in this process on a loopback port (`memact.engines.serve.make_server`, the
HF engine, greedy); for each repeat one non-streamed request, then the same request streamed:
prints the seconds to the first content delta, to the last chunk, the non-streamed reply's
seconds, the number of content deltas and completion tokens, and first-delta / whole as the
ratio against the non-streamed baseline of the same repeat.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory (memact new-model / import-model)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="Write three sentences about the history of the river Thames.")
    args = ap.parse_args()

    import openai

    from memact.agent.cli_serve import load_backend
    from memact.engines.serve import make_server

    backend = load_backend(args.model, served_model_name="bench")
    server = make_server(backend, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="none",
                           max_retries=0, timeout=600)
    request = {"model": "bench", "messages": [{"role": "user", "content": args.prompt}], "temperature": 0.0,
               "max_tokens": args.max_tokens}
    rows = []
    try:
        client.chat.completions.create(**{**request, "max_tokens": 2})  # warm-up
        for r in range(args.repeats):
            t0 = time.perf_counter()
            whole = client.chat.completions.create(**request)
            t_whole = time.perf_counter() - t0
            t0, first, deltas, usage, text = time.perf_counter(), None, 0, None, ""
            for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
                for choice in chunk.choices:
                    if choice.delta.content:
                        deltas += 1
                        text += choice.delta.content
                        first = first if first is not None else time.perf_counter() - t0
                usage = chunk.usage or usage
            t_last = time.perf_counter() - t0
            assert text == (whole.choices[0].message.content or ""), "streamed and whole replies differ"
            rows.append((first, t_last, t_whole, deltas, usage.completion_tokens))
            print(f"repeat {r}: first delta {first:.3f} s, last chunk {t_last:.3f} s, whole reply {t_whole:.3f} s, "
                  f"{deltas} deltas for {usage.completion_tokens} tokens, first/whole {first / t_whole:.3f}")
    finally:
        server.shutdown()
        server.server_close()
        backend.close()
    med = [statistics.median(col) for col in zip(*rows)]
    print(f"median of {len(rows)}: first delta {med[0]:.3f} s, last chunk {med[1]:.3f} s, whole reply {med[2]:.3f} s, "
          f"first/whole {med[0] / med[2]:.3f}, last/whole {med[1] / med[2]:.3f}")


if __name__ == "__main__":
    main()

"""A fast OpenAI-compatible upstream for the gateway benchmark, in its own process.

Serves versions `a` and `b` (served model names `a`, `b`); prints one JSON line
`{"a": url, "b": url}` once listening, then runs until killed.

    python -m bench.upstream_server [--chunks 64] [--delay-s 0] [--chunk-delay-s 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json

from tests.integration.upstream import FakeUpstream

CHUNKS = 64  # per streamed answer, unless --chunks says otherwise


async def main(chunks: int, delay_s: float, chunk_delay_s: float) -> None:
    upstreams = [await FakeUpstream(v, v, chunks=chunks, delay_s=delay_s,
                                    chunk_delay_s=chunk_delay_s, record=False).start()
                 for v in ("a", "b")]
    print(json.dumps({u.version: u.url for u in upstreams}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=CHUNKS)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--chunk-delay-s", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(main(args.chunks, args.delay_s, args.chunk_delay_s))

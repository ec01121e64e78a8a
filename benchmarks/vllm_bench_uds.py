"""vLLM's serving benchmark (`vllm bench serve`) against an engine's Unix socket, its result as one
JSON line: `python benchmarks/vllm_bench_uds.py SOCKET ARGS` (ARGS are `vllm bench serve`'s own,
with `--base-url http://engine`; the engine's key, if it needs one, in OPENAI_API_KEY).

inferd's engines listen on a Unix socket in a private folder, never on a TCP port, and vLLM's
tool speaks TCP only: in this process (the benchmark's own), its aiohttp connectors are made Unix
ones on SOCKET. Used by serve_overhead.py to load an engine straight, beside inferd.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import aiohttp
from vllm.benchmarks import serve

# The connector arguments vLLM's tool gives that a Unix connector takes too (the others are
# about DNS and TLS).
_KEPT = ("limit", "limit_per_host", "keepalive_timeout", "force_close")


def _unix_connectors(path: str) -> None:
    def connector(**kwargs: Any) -> aiohttp.UnixConnector:
        return aiohttp.UnixConnector(path=path, **{k: v for k, v in kwargs.items() if k in _KEPT})

    serve.aiohttp.TCPConnector = connector


if __name__ == "__main__":
    socket, *args = sys.argv[1:]
    _unix_connectors(socket)
    parser = argparse.ArgumentParser()
    serve.add_cli_args(parser)
    result = serve.main(parser.parse_args(args))
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, int | float | str)}))

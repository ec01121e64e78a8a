"""Run vLLM's serving benchmark (`vllm bench serve`) and print its result as one JSON line:
`python -m inferd.bench.vllm_runner ARGS` (ARGS are `vllm bench serve`'s own).

The `vllm` console script of the CPU build is broken (it looks up the distribution name `vllm`),
so the benchmark is driven through its Python entry points, in a process of its own. Arguments
are `vllm bench serve`'s own.
"""

from __future__ import annotations

import argparse
import json
import sys

from vllm.benchmarks import serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    serve.add_cli_args(parser)
    result = serve.main(parser.parse_args(sys.argv[1:]))
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, int | float | str)}))

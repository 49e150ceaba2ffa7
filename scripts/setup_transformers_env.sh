#!/usr/bin/env bash
# Build (once) a virtual environment with the oldest transformers tokensieve supports (the
# lower bound of `transformers>=X,<Y` in pyproject.toml, exactly X), beside this machine's
# torch, and print its python. CI runs the model tests in it; the main run tests the newest.
#
# Made with --system-site-packages: torch (pip is constrained to it) and tokensieve itself
# (the editable install) come from the python that runs this script; only transformers (and
# what that release pins differently) is installed into the environment. It lives outside
# the clone, in
#   ${TOKENSIEVE_CACHE:-~/.cache/tokensieve}/envs/transformers-<X>-<hash>
# keyed by X, the python version and the torch version, and is only built when missing (an
# unfinished build is removed and redone). A build takes about 30 s.
#
# Usage:  PY=$(bash scripts/setup_transformers_env.sh)   # progress on stderr, python on stdout
#         PYTHONPATH=src "$PY" -m pytest tests/test_models_llava.py
# Environment: PYTHON (default: python), TOKENSIEVE_CACHE, TRANSFORMERS_VERSION (default: the
# lower bound in pyproject.toml).
set -euo pipefail
LOG_TAG=setup_transformers_env
source "$(dirname "$0")/_cached_env.sh"
cd "$(dirname "$0")/.."

version="${TRANSFORMERS_VERSION:-$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)}"
if [[ -z "$version" ]]; then
  log "no 'transformers>=X,<Y' dependency found in pyproject.toml"
  exit 1
fi
cached_env_begin "transformers-$version" "transformers==$version"
env_pip install -c "$constraints" "transformers==$version"
got=$("$py" -c 'import torch, transformers; print(torch.__version__, transformers.__version__)')
if ! "$py" -c 'import sys, torch, transformers; from packaging.version import Version as V
sys.exit(torch.__version__ != sys.argv[1] or V(transformers.__version__) != V(sys.argv[2]))' \
    "$torch_version" "$version"; then
  log "unexpected versions in the environment: $got (wanted torch $torch_version, transformers $version); removing it"
  rm -rf "$env_dir"
  exit 1
fi
cached_env_done

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
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
log() { echo "[setup_transformers_env] $*" >&2; }

version="${TRANSFORMERS_VERSION:-$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)}"
if [[ -z "$version" ]]; then
  log "no 'transformers>=X,<Y' dependency found in pyproject.toml"
  exit 1
fi
base_py_info=$("$PYTHON" -c 'import sys, torch; print(f"{sys.version_info[0]}.{sys.version_info[1]} {torch.__version__}")')
torch_version=${base_py_info#* }
key=$(printf '%s\n' "transformers==$version" "$base_py_info" | sha256sum | cut -c1-12)
cache="${TOKENSIEVE_CACHE:-$HOME/.cache/tokensieve}"
env_dir="$cache/envs/transformers-$version-$key"
py="$env_dir/bin/python"

if [[ -f "$env_dir/.complete" && -x "$py" ]]; then
  log "reusing $env_dir"
  echo "$py"
  exit 0
fi

start=$(date +%s)
log "building $env_dir (transformers==$version, python+torch: $base_py_info)"
rm -rf "$env_dir"
mkdir -p "$cache/envs"
"$PYTHON" -m venv --system-site-packages "$env_dir"
constraints="$env_dir/constraints.txt"
echo "torch==$torch_version" > "$constraints"
build_log="$env_dir/build.log"
if ! "$py" -m pip install --disable-pip-version-check --no-input -c "$constraints" \
    "transformers==$version" >>"$build_log" 2>&1; then
  tail -n 40 "$build_log" >&2
  log "pip install transformers==$version failed (log: $build_log)"
  exit 1
fi
got=$("$py" -c 'import torch, transformers; print(torch.__version__, transformers.__version__)')
if ! "$py" -c 'import sys, torch, transformers; from packaging.version import Version as V
sys.exit(torch.__version__ != sys.argv[1] or V(transformers.__version__) != V(sys.argv[2]))' \
    "$torch_version" "$version"; then
  log "unexpected versions in the environment: $got (wanted torch $torch_version, transformers $version); removing it"
  rm -rf "$env_dir"
  exit 1
fi
touch "$env_dir/.complete"
log "built in $(( $(date +%s) - start )) s"
echo "$py"

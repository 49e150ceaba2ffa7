#!/usr/bin/env bash
# Build (once) a virtual environment for lmms-eval beside this machine's torch, and print
# its python.
#
# lmms-eval's declared dependencies pull a CUDA torch, torchvision and timm; on the
# tokensieve / generate_until path it imports far less. The environment is made with
# --system-site-packages (torch, transformers and tokensieve itself come from the python
# that runs this script, unchanged: pip is constrained to that torch) and gets
# lmms-eval --no-deps plus what it imports on that path. It lives outside the clone, in
#   ${TOKENSIEVE_CACHE:-~/.cache/tokensieve}/envs/lmms-eval-<version>-<hash>
# keyed by the pins below, the python version and the torch version, and is only built
# when missing (an unfinished build is removed and redone).
#
# Usage:  PY=$(bash scripts/setup_lmms_eval_env.sh)   # progress on stderr, the python on stdout
#         "$PY" -m lmms_eval --model tokensieve ...
# Environment: PYTHON (default: python), TOKENSIEVE_CACHE.
set -euo pipefail

LMMS_EVAL_VERSION="0.7.3"
# What lmms-eval 0.7.3 imports on this path beyond torch / transformers / numpy / pillow /
# pyyaml / jinja2 / tqdm / packaging (found by running it). filelock < 4: lmms-eval
# patches filelock._api, which filelock 4 removed.
PINS=(
  "accelerate==1.15.0"
  "datasets==5.2.0"
  "evaluate==0.4.6"
  "loguru==0.7.3"
  "sacrebleu==2.6.0"
  "pytablewriter==1.2.1"
  "pytz==2026.6"
  "tenacity==9.2.1"
  "filelock==3.32.7"
)

PYTHON="${PYTHON:-python}"
log() { echo "[setup_lmms_eval_env] $*" >&2; }

base_py_info=$("$PYTHON" -c 'import sys, torch; print(f"{sys.version_info[0]}.{sys.version_info[1]} {torch.__version__}")')
torch_version=${base_py_info#* }
key=$(printf '%s\n' "lmms-eval==$LMMS_EVAL_VERSION" "${PINS[@]}" "$base_py_info" | sha256sum | cut -c1-12)
cache="${TOKENSIEVE_CACHE:-$HOME/.cache/tokensieve}"
env_dir="$cache/envs/lmms-eval-$LMMS_EVAL_VERSION-$key"
py="$env_dir/bin/python"

if [[ -f "$env_dir/.complete" && -x "$py" ]]; then
  log "reusing $env_dir"
  echo "$py"
  exit 0
fi

start=$(date +%s)
log "building $env_dir (python+torch: $base_py_info)"
rm -rf "$env_dir"
mkdir -p "$cache/envs"
"$PYTHON" -m venv --system-site-packages "$env_dir"
constraints="$env_dir/constraints.txt"
echo "torch==$torch_version" > "$constraints"
build_log="$env_dir/build.log"
pip_install() {
  if ! "$py" -m pip install --disable-pip-version-check --no-input -c "$constraints" "$@" \
      >>"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    log "pip install $* failed (log: $build_log)"
    exit 1
  fi
}
pip_install "${PINS[@]}"
# pip reports lmms-eval's undeclared-here dependencies as conflicts: expected, see above
pip_install --no-deps "lmms-eval==$LMMS_EVAL_VERSION"

# the environment must still run this machine's torch, and lmms-eval's evaluator must import
got=$("$py" -c 'import torch; print(torch.__version__)')
if [[ "$got" != "$torch_version" ]]; then
  log "torch changed in the environment ($torch_version -> $got); removing it"
  rm -rf "$env_dir"
  exit 1
fi
"$py" -c 'import lmms_eval.evaluator, lmms_eval.models, lmms_eval.tasks' >&2
touch "$env_dir/.complete"
log "built in $(( $(date +%s) - start )) s"
echo "$py"

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

LOG_TAG=setup_lmms_eval_env
source "$(dirname "$0")/_cached_env.sh"
cached_env_begin "lmms-eval-$LMMS_EVAL_VERSION" "lmms-eval==$LMMS_EVAL_VERSION" "${PINS[@]}"
env_pip install -c "$constraints" "${PINS[@]}"
# pip reports lmms-eval's undeclared-here dependencies as conflicts: expected, see above
env_pip install -c "$constraints" --no-deps "lmms-eval==$LMMS_EVAL_VERSION"
# the environment must still run this machine's torch, and lmms-eval's evaluator must import
env_check_torch
"$py" -c 'import lmms_eval.evaluator, lmms_eval.models, lmms_eval.tasks' >&2
cached_env_done

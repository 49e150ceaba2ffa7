# Shared by the scripts/setup_*_env.sh scripts (sourced, not run): a virtual environment
# beside this machine's torch, made with --system-site-packages, cached outside the clone in
#   ${TOKENSIEVE_CACHE:-~/.cache/tokensieve}/envs/<name>-<hash>
# keyed by the given pins, the python version and the torch version; built only when
# missing (an unfinished build is removed and redone). pip is constrained to that torch.
#
# A script sets LOG_TAG, calls `cached_env_begin NAME PIN...` (prints the python and exits
# when the environment is complete), installs with `env_pip install -c "$constraints" ...`,
# checks with `env_check_torch`, and ends with `cached_env_done`.

PYTHON="${PYTHON:-python}"
log() { echo "[${LOG_TAG:-setup_env}] $*" >&2; }

cached_env_begin() {
  local name=$1
  shift
  base_py_info=$("$PYTHON" -c 'import sys, torch; print(f"{sys.version_info[0]}.{sys.version_info[1]} {torch.__version__}")')
  torch_version=${base_py_info#* }
  local key
  key=$(printf '%s\n' "$@" "$base_py_info" | sha256sum | cut -c1-12)
  local cache="${TOKENSIEVE_CACHE:-$HOME/.cache/tokensieve}"
  env_dir="$cache/envs/$name-$key"
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
}

# `env_pip ARGS...`: pip in the environment, output to the build log; stops on failure.
env_pip() {
  if ! "$py" -m pip "$@" --disable-pip-version-check --no-input >>"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    log "pip $* failed (log: $build_log)"
    exit 1
  fi
}

# The environment must still run this machine's torch.
env_check_torch() {
  local got
  got=$("$py" -c 'import torch; print(torch.__version__)')
  if [[ "$got" != "$torch_version" ]]; then
    log "torch changed in the environment ($torch_version -> $got); removing it"
    rm -rf "$env_dir"
    exit 1
  fi
}

cached_env_done() {
  touch "$env_dir/.complete"
  log "built in $(( $(date +%s) - start )) s"
  echo "$py"
}

#!/usr/bin/env bash
# Shared by sft.sh and train_dcpo.sh: split launcher options from trainer arguments, then
# start `python -m memact.dcpo.cli_train <command>` under the deepspeed launcher.
set -euo pipefail
command="$1"; shift
launcher=()
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_gpus|--num_nodes|--hostfile|--master_port|--master_addr|--include|--exclude)
      launcher+=("$1" "$2"); shift 2 ;;
    --num_gpus=*|--num_nodes=*|--hostfile=*|--master_port=*|--master_addr=*|--include=*|--exclude=*)
      launcher+=("$1"); shift ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$py" ]] || py=python3
ds="$(dirname "$py")/deepspeed"
[[ -x "$ds" ]] || ds=deepspeed
# PATH so the launcher's child `python` is the same interpreter.
PATH="$(dirname "$py"):$PATH" exec "$ds" ${launcher[@]+"${launcher[@]}"} --module memact.dcpo.cli_train "$command" \
  ${args[@]+"${args[@]}"}

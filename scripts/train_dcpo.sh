#!/usr/bin/env bash
# DCPO through the deepspeed launcher: one process per GPU (or one on a CPU).
#
#   scripts/train_dcpo.sh --num_gpus 8 --config configs/qwen2.5_14b_dcpo_8xh100.yaml
#   scripts/train_dcpo.sh --hostfile hosts --num_gpus 8 --config ... run.steps=40
#   scripts/train_dcpo.sh --config configs/tiny_cpu_dcpo.yaml model.path=runs/tiny_sft   # CPU, 1 process
#
# --num_gpus, --num_nodes, --hostfile, --master_port go to the launcher; everything else to
# `python -m memact.dcpo.cli_train train` (which ignores the --local_rank the launcher adds:
# ranks come from the environment it sets).
set -euo pipefail
exec "$(dirname "$0")/_launch.sh" train "$@"

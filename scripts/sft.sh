#!/usr/bin/env bash
# SFT cold start through the deepspeed launcher.
#
#   scripts/sft.sh --data runs/sft2.jsonl --out runs/tiny_sft model.path=runs/tiny
#   scripts/sft.sh --num_gpus 8 --config my_sft.yaml --data traj.jsonl --out runs/sft14b
#
# Launcher options as in train_dcpo.sh; the rest goes to `python -m memact.dcpo.cli_train sft`.
set -euo pipefail
exec "$(dirname "$0")/_launch.sh" sft "$@"

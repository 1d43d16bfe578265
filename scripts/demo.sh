#!/usr/bin/env bash
# Command 1: train a small DDPM on the bundled 8x8 digits (CPU, about ten minutes), then sample.
# Extra arguments go to both launch.py calls, e.g. --config.training.num_train_steps=500.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
WORKDIR="${WORKDIR:-runs/digits}"
"$PY" launch.py --config=configs/digits.py --workdir="$WORKDIR" --mode=train "$@"
"$PY" launch.py --config=configs/digits.py --workdir="$WORKDIR" --mode=sample "$@"

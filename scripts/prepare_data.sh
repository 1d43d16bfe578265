#!/usr/bin/env bash
# Prepares a TFDS dataset of the configs once, as the array_record files training reads:
#   bash scripts/prepare_data.sh NAME [--data_dir=DIR] [--manual_dir=DIR]
# NAME: mnist, fashion_mnist, cifar10, celeb_a, celeb_a_hq/256, lsun/church_outdoor, lsun/bedroom,
# downsampled_imagenet/32x32 or downsampled_imagenet/64x64. DIR defaults to TFDS's data dir
# ($TFDS_DATA_DIR, else ~/tensorflow_datasets), the manual dir to DIR/downloads/manual.
# TFDS's builders need TensorFlow, which training does not: the build runs in its own venv,
# .venv-prepare (scripts/requirements-prepare.txt; DDPM_PREPARE_VENV=path picks another one),
# made on first use. Prints the --config.data.tfds_data_dir=... flag to train with.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
CALLER="$PWD"  # relative --data_dir / --manual_dir are relative to where you run this
# Name, flags and manually downloaded files first: a mistake costs no install.
"${PYTHON:-python3}" "$HERE/prepare_data.py" --check "$@" || { rc=$?; [ $rc = 3 ] && exit 0; exit $rc; }
VENV="${DDPM_PREPARE_VENV:-$ROOT/.venv-prepare}" REQUIREMENTS="$HERE/requirements-prepare.txt" \
  source "$HERE/env.sh"
cd "$CALLER"
exec "$PY" "$HERE/prepare_data.py" "$@"

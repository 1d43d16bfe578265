#!/usr/bin/env bash
# The README's speed comparison with denoising-diffusion-pytorch, on this machine, in one run:
# times the peer (in its own venv, ~/peer-venv, created on first use), then our benchmark of
# configs/bench32.py on one CPU device and on one device per core, and prints a table of ratios
# for each. Extra arguments go to launch.py.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
PEER_VENV="${PEER_VENV:-$HOME/peer-venv}"
OUT="${OUT:-runs/compare_peer}"
# Installs again when an earlier install did not finish (the venv exists but lacks the library).
if ! "$PEER_VENV/bin/python" -c "import denoising_diffusion_pytorch" 2> /dev/null; then
  echo "[ddpm-jax] installing denoising-diffusion-pytorch into $PEER_VENV (PyTorch, about 1 GB)"
  "${PYTHON:-python3}" -m venv "$PEER_VENV"
  "$PEER_VENV/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1 \
    denoising-diffusion-pytorch==2.3.4
fi
mkdir -p "$OUT"
"$PEER_VENV/bin/python" scripts/bench_peer.py --out "$OUT/peer.json" > /dev/null
# Ours twice: JAX's default of one CPU device, then one device per core (--cpu_devices=auto).
for devices in default auto; do
  flag=(); [ "$devices" = auto ] && flag=(--cpu_devices=auto)
  "$PY" launch.py --config=configs/bench32.py --workdir="$OUT/$devices" --mode=benchmark \
    --config.benchmark.sample_steps=100 "${flag[@]}" "$@" > /dev/null
  "$PY" scripts/compare_peer.py "$OUT/$devices/benchmark.json" "$OUT/peer.json"
  echo
done

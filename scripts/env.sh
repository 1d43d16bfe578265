# Sourced by demo.sh, test.sh and prepare_data.sh: creates the venv $VENV (default .venv) on first
# use and installs $REQUIREMENTS (default requirements.txt) into it, again whenever that file
# changes. PYTHON picks the interpreter (default: python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
REQUIREMENTS="${REQUIREMENTS:-$ROOT/requirements.txt}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[ddpm-jax] creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[ddpm-jax] installing $(basename "$REQUIREMENTS") into $VENV (about a minute)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
  echo "$WANT" > "$STAMP"
fi
PY="$VENV/bin/python"
cd "$ROOT"

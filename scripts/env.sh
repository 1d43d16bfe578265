# Sourced by demo.sh, test.sh and prepare_data.sh: creates the venv $VENV (default .venv) on first
# use and installs $REQUIREMENTS (default requirements.txt) into it, and with DDPM_TEST_REQUIREMENTS=1
# (test.sh) requirements-test.txt too; each file again whenever it changes. PYTHON picks the
# interpreter (default: python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
REQUIREMENTS="${REQUIREMENTS:-$ROOT/requirements.txt}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[ddpm-jax] creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
FILES=("$REQUIREMENTS")
if [ "${DDPM_TEST_REQUIREMENTS:-0}" = 1 ]; then FILES+=("$ROOT/requirements-test.txt"); fi
# One stamp per file, so demo.sh and test.sh do not undo each other's installs.
TODO=() NAMES=()
for f in "${FILES[@]}"; do
  if [ "$(cat "$VENV/.$(basename "$f").sha256" 2>/dev/null)" != "$(sha256sum "$f" | cut -d' ' -f1)" ]
  then
    TODO+=(-r "$f") NAMES+=("$(basename "$f")")
  fi
done
if [ "${#TODO[@]}" -gt 0 ]; then
  echo "[ddpm-jax] installing ${NAMES[*]} into $VENV (about a minute)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TODO[@]}"
  for f in "${FILES[@]}"; do sha256sum "$f" | cut -d' ' -f1 > "$VENV/.$(basename "$f").sha256"; done
fi
PY="$VENV/bin/python"
cd "$ROOT"

# Sourced by demo.sh and test.sh: creates .venv on first use and installs requirements.txt (and,
# for test.sh, requirements-test.txt), again whenever one of them changes. PYTHON picks the
# interpreter (default: python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[ddpm-jax] creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# install_requirements FILE...: pip install -r the FILEs that changed since they were last
# installed into this venv (one stamp per file, so demo.sh and test.sh do not undo each other).
install_requirements() {
  local f todo=()
  for f in "$@"; do
    if [ "$(cat "$VENV/.$f.sha256" 2>/dev/null)" != "$(sha256sum "$ROOT/$f" | cut -d' ' -f1)" ]; then
      todo+=(-r "$ROOT/$f")
    fi
  done
  if [ "${#todo[@]}" -gt 0 ]; then
    echo "[ddpm-jax] installing $* into $VENV (about a minute)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${todo[@]}"
    for f in "$@"; do sha256sum "$ROOT/$f" | cut -d' ' -f1 > "$VENV/.$f.sha256"; done
  fi
}
install_requirements ${DDPM_REQUIREMENTS:-requirements.txt}
PY="$VENV/bin/python"
cd "$ROOT"

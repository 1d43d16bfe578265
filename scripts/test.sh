#!/usr/bin/env bash
# Command 2: the whole default test suite (CPU, fast; heavy tests are marked `slow`).
# Extra arguments go to pytest, e.g. `-m slow` or `tests/test_diffusion.py`.
DDPM_REQUIREMENTS="requirements.txt requirements-test.txt"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -m pytest "$@"

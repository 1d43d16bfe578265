#!/usr/bin/env bash
# Command 2: the whole default test suite (CPU, fast; heavy tests are marked `slow`).
# Extra arguments go to pytest, e.g. `-m slow` or `tests/test_diffusion.py`.
DDPM_TEST_REQUIREMENTS=1  # also requirements-test.txt (the Cloud Storage emulator)
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -m pytest "$@"

"""The README's notebook quickstart keeps running."""
import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_quickstart_block_runs():
  text = open(README).read()
  section = text[text.index("## Quickstart"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert len(code.strip().splitlines()) <= 25
  scope = {}
  exec(compile(code, "README quickstart", "exec"), scope)  # pylint: disable=exec-used
  assert np.isfinite(float(scope["loss"]))
  samples = np.asarray(scope["samples"])
  assert samples.shape == (4, 16, 16, 1)
  assert np.all(np.isfinite(samples)) and np.all(np.abs(samples) <= 1.0)
  # A real gradient: non-zero somewhere (the last layers start at zero, the rest does not).
  import jax
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(scope["grads"]))

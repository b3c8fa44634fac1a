"""The README's code runs as written."""

import re
from pathlib import Path

import jax
import numpy as np

README = Path(__file__).parents[1] / "README.md"


def test_readme_example_runs():
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["z1"].shape == (8, 32, 32, 16)
    for grad in jax.tree.leaves(namespace["grads"]):
        assert np.all(np.isfinite(grad)) and np.any(grad != 0)

"""Shared test configuration: float64 for gradient checks, strict rank promotion, and a
compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# The training tests compile the same train step in many runs (each train_and_evaluate jits
# afresh); a persistent cache, new for every session, compiles each program once. A cache
# hit loads the same executable, so bit-identity checks are unaffected.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="anodev2-jax-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def tree_allclose(a, b, *, rtol: float = 1e-12, atol: float = 0.0) -> bool:
    """True when two pytrees have the same structure and allclose leaves."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def tree_relative_error(a, b) -> float:
    """max over leaves of |a - b| / max(|b|, tiny), as one number."""
    errors = [
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(np.max(np.abs(y)), 1e-300))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(errors, default=0.0)


@pytest.fixture
def key():
    return jax.random.key(0)

"""host_malloc: the settings remove XLA:CPU's per-call page faults; misuse is reported."""

import subprocess
import sys
import textwrap

import pytest

from anodev2_jax.cpu import host_malloc

# A jitted program whose temporary buffer (~200 MiB) is far above glibc's 64 MiB arena limit;
# prints whether it ran tuned and the median of the minor page faults of 10 calls after 10.
FAULTS_PER_CALL = textwrap.dedent(
    """
    import resource, statistics, sys
    from anodev2_jax.cpu import host_malloc
    host_malloc.restart_tuned(sys.argv[1])
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):
        for _ in range(4):
            x = jnp.sin(jnp.concatenate([x, x])[::2] * 1.5) + x
        return x.sum()

    x = jnp.ones((25_000_000,), jnp.float32)
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(host_malloc.is_tuned(), statistics.median(faults[10:]))
    """
)


def faults_per_call(mode: str) -> tuple[bool, float]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_CALL, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    ).stdout.split()
    return out[-2] == "True", float(out[-1])


@pytest.mark.skipif(not host_malloc.uses_glibc(), reason="host_malloc tunes glibc's malloc only")
def test_tuned_malloc_removes_the_page_faults_of_each_call():
    tuned, tuned_faults = faults_per_call("tuned")
    untuned, default_faults = faults_per_call("default")
    assert tuned and not untuned
    # untuned: each call maps its temporary buffer afresh (~200 MiB / 4 KiB pages); tuned, the
    # heap still grows now and then while it settles, hence the median
    assert default_faults > 20_000
    assert tuned_faults < 0.01 * default_faults


def test_tunables_merge_with_the_environment_and_bad_modes_are_named():
    value = host_malloc.tunables_value("glibc.malloc.arena_max=8:glibc.pthread.rseq=0")
    assert "glibc.pthread.rseq=0" in value and "glibc.malloc.arena_max=1" in value
    assert "arena_max=8" not in value
    assert host_malloc.is_tuned({"GLIBC_TUNABLES": value})
    assert not host_malloc.is_tuned({})
    assert host_malloc.wants_tuning("default") is False
    with pytest.raises(ValueError, match="mode='fast' is unknown"):
        host_malloc.wants_tuning("fast")

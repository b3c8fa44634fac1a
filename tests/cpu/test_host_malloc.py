"""host_malloc: the settings remove XLA:CPU's per-call page faults; misuse is reported."""

import json
import subprocess
import sys
import textwrap

import pytest

from anodev2_jax.cpu import host_malloc

# A jitted program whose temporary buffer (~200 MiB) is far above glibc's 64 MiB arena limit;
# prints whether it ran tuned and, per call, its minor page faults and the NUMA hint faults.
FAULTS_PER_CALL = textwrap.dedent(
    """
    import json, resource, sys
    from anodev2_jax.cpu import host_malloc
    host_malloc.restart_tuned(sys.argv[1])
    import jax, jax.numpy as jnp

    def numa_hint_faults():
        # the kernel's NUMA balancing unmaps pages it samples; touching them again is a minor
        # fault that malloc has no part in (system-wide count; 0 without NUMA balancing)
        with open("/proc/vmstat") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("numa_hint_faults "))

    @jax.jit
    def f(x):
        for _ in range(4):
            x = jnp.sin(jnp.concatenate([x, x])[::2] * 1.5) + x
        return x.sum()

    x = jnp.ones((25_000_000,), jnp.float32)
    faults, hints = [], []
    for _ in range(40):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        hints_before = numa_hint_faults()
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        hints.append(numa_hint_faults() - hints_before)
    print(json.dumps({"tuned": host_malloc.is_tuned(), "faults": faults, "numa_hints": hints}))
    """
)


def faults_per_call(mode: str) -> tuple[bool, list[int], dict]:
    """Whether the child ran tuned, its malloc page faults in each of the last 20 of 40 calls
    (minor faults less NUMA-balancing hint faults), and its raw counts."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_CALL, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    ).stdout.splitlines()
    record = json.loads(out[-1])
    net = [max(f - h, 0) for f, h in zip(record["faults"], record["numa_hints"], strict=True)]
    return record["tuned"], net[20:], record


@pytest.mark.skipif(not host_malloc.uses_glibc(), reason="host_malloc tunes glibc's malloc only")
def test_tuned_malloc_removes_the_page_faults_of_each_call():
    tuned, tuned_faults, tuned_record = faults_per_call("tuned")
    untuned, default_faults, default_record = faults_per_call("default")
    assert tuned and not untuned
    # untuned, every call maps its temporary buffer afresh (~480 MiB / 4 KiB pages). Tuned, most
    # calls reuse the heap; it still grows now and then when small blocks split a freed one (how
    # often varies from machine to machine: 0 to 3 of 20 calls here, up to half seen in CI)
    per_call = min(default_faults)
    assert per_call > 20_000, default_record
    quiet_calls = sum(faults < 0.01 * per_call for faults in tuned_faults)
    assert quiet_calls >= 5, (tuned_record, default_record)


def test_tunables_merge_with_the_environment_and_bad_modes_are_named():
    value = host_malloc.tunables_value("glibc.malloc.arena_max=8:glibc.pthread.rseq=0")
    assert "glibc.pthread.rseq=0" in value and "glibc.malloc.arena_max=1" in value
    assert "arena_max=8" not in value
    assert host_malloc.is_tuned({"GLIBC_TUNABLES": value})
    assert not host_malloc.is_tuned({})
    assert host_malloc.wants_tuning("default") is False
    with pytest.raises(ValueError, match="mode='fast' is unknown"):
        host_malloc.wants_tuning("fast")

"""Process settings for small shared CPU machines (moeshrink.runtime)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import pytest
import torch

from moeshrink.runtime import SPIN_COUNT, compute_dtype, cpu_has_native_bf16, keep_freed_memory

SHOW = "import os, sys; {first}; print(os.environ.get('GOMP_SPINCOUNT'))"


def _spin_count(first: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = SHOW.format(first=first)
    done = subprocess.run(
        [sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_import_limits_openmp_spinning_before_torch_loads():
    assert _spin_count("import moeshrink") == SPIN_COUNT
    # the user's settings win, and after torch has loaded libgomp it would be too late to matter
    assert _spin_count("import moeshrink", OMP_WAIT_POLICY="PASSIVE") == "None"
    assert _spin_count("import torch, moeshrink") == "None"


def _faults_of_second_allocation(mib: int) -> int:
    """Minor page faults taken to fill a tensor of ``mib`` MiB just after an equal one was freed."""
    torch.ones(mib << 18).sum()  # allocated, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(mib << 18).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_keep_freed_memory_reuses_large_allocations_and_restores_the_defaults():
    pages = (64 << 20) // resource.getpagesize()
    assert _faults_of_second_allocation(64) > pages // 2  # glibc maps and faults in every large tensor
    with keep_freed_memory() as applied:
        assert applied
        assert _faults_of_second_allocation(64) < pages // 10  # reused from the heap
    # after it, a tensor larger than the free memory kept in the heap is mapped afresh again
    assert _faults_of_second_allocation(256) > 4 * pages // 2


def test_compute_dtype_upcasts_half_precision_on_a_cpu_without_it():
    assert compute_dtype(torch.float32) == torch.float32
    assert compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert compute_dtype(torch.bfloat16) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    # PyTorch's kernels limited to AVX2 (as on a CPU without AVX-512): float32
    code = "import torch; from moeshrink.runtime import compute_dtype; print(compute_dtype(torch.bfloat16))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.float32"

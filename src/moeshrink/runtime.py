"""Process settings that keep PyTorch's CPU work fast on a small machine shared with other work.

Measured on the testbed (2 cores; ``docs/cpu_settings.md`` has the numbers and the command):

* **OpenMP threads that spin.** PyTorch's OpenMP (libgomp) threads spin up to 300,000 times at every
  barrier before they sleep. When another process wants the same cores, the spinning thread holds a
  core the other thread of the same region needs: a perplexity pass took 5.6 s instead of 1.5 s beside
  a second such process, and 37-127 s instead of 4 s on this machine with others' jobs running.
  ``GOMP_SPINCOUNT=1000`` (libgomp's own value when it knows the machine is oversubscribed) costs
  about 5% on an idle machine and keeps it near the fair share. It must be set before libgomp loads,
  i.e. before ``import torch``: ``import moeshrink`` sets it then (unless OpenMP's wait policy or
  spin count is set already).
* **Allocations over 32 MiB.** glibc serves them with a fresh ``mmap`` each time and returns them on
  ``free``, so every batch's logits (8 x 256 x 8,192 values) are page-faulted in anew: half of a
  perplexity pass's time, and a third of the demo's CPU time was the kernel's. :func:`keep_freed_memory`
  keeps freed memory in the process for reuse while an evaluation runs.
* **bfloat16 on a CPU without native bfloat16.** With AVX2 only, a bfloat16 forward of the testbed
  takes about four times the CPU time of a float32 one (with AVX-512 BF16 about half):
  :func:`compute_dtype` says when to compute in float32 instead (an exact upcast; outputs are still
  written in the checkpoint's dtype).

``torch`` is imported inside the functions: this module runs before anything loads it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SPIN_COUNT = "1000"

# glibc's mallopt parameters and the values it uses when left alone (the trim threshold grows to
# twice the mmap threshold, at most 64 MiB on 64-bit machines)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD = 65536, 64 << 20
_KEEP_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int)


def limit_openmp_spinning() -> bool:
    """Set ``GOMP_SPINCOUNT`` unless OpenMP's waiting is configured already or torch (and with it
    libgomp, which reads it once) is loaded; return whether it was set."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def _mallopt() -> Callable[[int, int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), "mallopt", None)


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Within the block, glibc serves every allocation from the process's heap and keeps what is freed
    for the next allocation (no ``mmap`` per large tensor, no trimming); after it, its usual limits
    return (large tensors mapped afresh, free heap beyond 64 MiB given back as it is next trimmed).
    Yields whether it applied (glibc on Linux only)."""
    mallopt = _mallopt()
    if mallopt is None:
        yield False
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD)
    try:
        yield True
    finally:
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX, and PyTorch's kernels use
    AVX-512: ``ATEN_CPU_CAPABILITY=avx2`` turns that off)."""
    import torch

    has = [
        getattr(torch.cpu, name, lambda: False)
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and any(f() for f in has)


def compute_dtype(dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype to compute in for weights of ``dtype`` on ``device``: float32 for half precision on a
    CPU without native arithmetic for it (float16 always; bfloat16 without AVX-512 BF16 or AMX), else
    ``dtype`` itself. Evaluation and the calibration layer loop both follow it."""
    import torch

    if torch.device(device).type != "cpu":
        return dtype
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not cpu_has_native_bf16()):
        return torch.float32
    return dtype

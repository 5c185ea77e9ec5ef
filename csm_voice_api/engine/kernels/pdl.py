"""Programmatic dependent launch (PDL, Hopper and later) for this package's kernels.

A frame is ~750 kernels in a row, each a few microseconds, so the gap between two kernels (the
next one launched only once the previous drained) is a large share of a frame. Launched with PDL,
the next kernel is scheduled while the previous one still runs and waits for it on the GPU.

The contract each kernel keeps: `chain_start(PDL)` is its first statement. It waits until the
previous kernel in the stream has finished and its writes are visible (so no load or store of
ours can race with it), then lets the next kernel be scheduled. Waiting is transitive: the next
kernel's wait returns only after ours finished, which was after the previous one.
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

from . import interpreting


def pdl() -> bool:
    """Launch with PDL: sm90+, not in the interpreter, not switched off (CSM_PDL=0)."""
    if interpreting() or os.environ.get("CSM_PDL", "1") in ("", "0"):
        return False
    return _sm90()


@functools.cache
def _sm90() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def launch_opts() -> dict:
    """Keyword arguments for every launch of this package's kernels: the kernel's PDL flag, and
    Triton's launch option when it is on (the interpreter takes no such option)."""
    return {"PDL": True, "launch_pdl": True} if pdl() else {"PDL": False}


@triton.jit
def chain_start(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

"""Triton kernels for the latency-bound decode step (CUDA only; tests run them in Triton's interpreter).

The depth decoder runs 31 sequential steps of 4 layers per frame; in plain PyTorch each layer is a
dozen tiny kernels, so a frame is launch-bound. Here a layer is five kernels: norm+qkv, attention
(with RoPE and the KV write), out-projection+residual, norm+gate/up+SwiGLU, down-projection+residual.

On Hopper and later the kernels chain with programmatic dependent launch (pdl.py).
"""

from __future__ import annotations

import os


def available() -> bool:
    """Triton importable and not switched off (CSM_TRITON=0)."""
    if os.environ.get("CSM_TRITON", "1") in ("", "0"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")

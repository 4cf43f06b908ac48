"""Constants shared across the package: written once here.

Imports nothing of the package (anything may import it).
"""

from __future__ import annotations

# Device types the Triton kernel runs on (dispatch keys: their upper-case names).
GPU_DEVICE_TYPES: tuple[str, ...] = ("xpu", "cuda")
# Head sizes the fused kernel path is taken for (as sgl-kernel-xpu): the pass's default and
# RotaryEmbedding's fused path.
DEFAULT_HEAD_SIZES: tuple[int, ...] = (128, 256, 512)
# Device types whose graphs the pass rewrites by default ("cpu" forces it on for CPU graphs).
DEFAULT_DEVICES: tuple[str, ...] = GPU_DEVICE_TYPES
# Every device type the pass's ``devices`` option may name.
KNOWN_DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "xpu")

"""Validation of the options of the ``rope_compile`` backend, ``FuseQKRopePass`` and
``RotaryEmbedding``: a bad option fails at once with a ``ValueError`` that names it (and, for a
near miss, the right name), not later with a raw shape error or an unrelated Inductor message.

    validate_pass_options(head_sizes, devices, strict)      # every pass's options
    validate_skip_pairs_only_read_by_copies(value)          # FuseQKRopePass's own option
    split_and_validate_backend_options(options)             # torch.compile's ``options`` dict
    validate_rotary_embedding_args(head_size, rotary_dim, ...)

This module imports nothing from ``passes`` (the pass imports it), and only torch.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .constants import (  # noqa: F401  (re-exported)
    DEFAULT_DEVICES,
    DEFAULT_HEAD_SIZES,
    GPU_DEVICE_TYPES,
    KNOWN_DEVICE_TYPES,
)

# Keys of the backend's ``options`` that are the passes'; every other key is an Inductor patch.
PASS_OPTIONS: tuple[str, ...] = ("head_sizes", "devices", "strict",
                                 "skip_pairs_only_read_by_copies")
# The options every pass of the chain takes; the others are ``FuseQKRopePass``'s alone.
SHARED_PASS_OPTIONS: tuple[str, ...] = ("head_sizes", "devices", "strict")

_PASS_PREFIX = "FuseQKRopePass / rope_compile option"
_MODULE_PREFIX = "RotaryEmbedding argument"
# Words that are not device types but say "a GPU": suggest the GPU types, not the close "cpu".
_GPU_WORDS = ("gpu", "gpus", "triton", "nvidia", "intel", "rocm", "hip")


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """``" (did you mean 'x' or 'y'?)"`` for the close matches of ``word``, or ``""``."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(word, candidates, n=n)
    if not matches:
        # Case and separators: "Head_Sizes", "head-sizes", "triton_cudagraphs".
        folded = {c.lower().replace("-", "_").replace(".", "_"): c for c in candidates}
        key = word.lower().replace("-", "_").replace(".", "_")
        matches = [folded[m] for m in difflib.get_close_matches(key, list(folded), n=n)]
    if not matches:
        return ""
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)"


def _is_int(value: Any) -> bool:
    """An int, or an int-like (numpy integer, 0-d integer tensor); never a bool."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _is_sequence(value: Any) -> bool:
    """A collection of items (tuple, list, set, range...), not a str, bytes, mapping or tensor."""
    return (isinstance(value, Iterable)
            and not isinstance(value, (str, bytes, Mapping, torch.Tensor)))


# --------------------------------------------------------------------------------------------
# the pass's options


def validate_head_sizes(head_sizes: Any) -> tuple[int, ...]:
    opt = f"{_PASS_PREFIX} `head_sizes`:"
    usage = "must be a tuple of positive even ints, e.g. (128,)"
    if not _is_sequence(head_sizes):
        hint = f"; for one size write ({head_sizes!r},)" if _is_int(head_sizes) else ""
        raise ValueError(f"{opt} {usage}, got {head_sizes!r} ({type(head_sizes).__name__}){hint}")
    items = tuple(head_sizes)
    if not items:
        raise ValueError(f"{opt} {usage}, got an empty {type(head_sizes).__name__}: the pass "
                         "would rewrite nothing (use backend='inductor' for that)")
    sizes = []
    for h in items:
        if not _is_int(h):
            raise ValueError(f"{opt} {usage}, got the entry {h!r} ({type(h).__name__}) "
                             f"in {head_sizes!r}")
        h = operator.index(h)
        if h <= 0 or h % 2:
            raise ValueError(f"{opt} {usage}, got the entry {h} in {head_sizes!r}")
        sizes.append(h)
    return tuple(sizes)


def _device_type_hint(word: str) -> str:
    if word.lower() in KNOWN_DEVICE_TYPES:
        return f" (did you mean {word.lower()!r}?)"
    if word.lower() in _GPU_WORDS:
        return f" (did you mean one of {GPU_DEVICE_TYPES}, the GPU device types?)"
    return did_you_mean(word.lower(), KNOWN_DEVICE_TYPES)


def validate_devices(devices: Any) -> tuple[str, ...]:
    opt = f"{_PASS_PREFIX} `devices`:"
    usage = f"must be a tuple of device types from {KNOWN_DEVICE_TYPES}"
    if isinstance(devices, (str, torch.device)):
        name = devices if isinstance(devices, str) else devices.type
        raise ValueError(f"{opt} {usage}, got the bare {type(devices).__name__} {devices!r}; "
                         f"write a tuple, e.g. ({name!r},)")
    if not _is_sequence(devices):
        raise ValueError(f"{opt} {usage}, e.g. ('cpu',), got {devices!r} "
                         f"({type(devices).__name__})")
    items = tuple(devices)
    if not items:
        raise ValueError(f"{opt} {usage}, got an empty {type(devices).__name__}: the pass would "
                         "rewrite nothing (use backend='inductor' for that)")
    types = []
    for d in items:
        if isinstance(d, torch.device):
            if d.index is not None:
                raise ValueError(f"{opt} {usage} (types, not devices), got {d!r} in "
                                 f"{devices!r} (did you mean {d.type!r}?)")
            d = d.type
        if not isinstance(d, str):
            raise ValueError(f"{opt} {usage}, got the entry {d!r} ({type(d).__name__}) "
                             f"in {devices!r}")
        if d not in KNOWN_DEVICE_TYPES:
            raise ValueError(f"{opt} {usage}, got the unknown device type {d!r} in {devices!r}"
                             f"{_device_type_hint(d)}")
        types.append(d)
    return tuple(types)


def _validate_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_PASS_PREFIX} `{name}`: must be a bool (True or False), got "
                         f"{value!r} ({type(value).__name__})")
    return value


def validate_strict(strict: Any) -> bool:
    return _validate_bool("strict", strict)


def validate_skip_pairs_only_read_by_copies(value: Any) -> bool:
    """``True`` (the default) leaves a pair whose rotated q and k are read only by layout
    copies to Inductor (``passes/layout_copy_rule.py``); ``False`` forces its rewrite."""
    return _validate_bool("skip_pairs_only_read_by_copies", value)


def validate_pass_options(head_sizes: Any, devices: Any,
                          strict: Any) -> tuple[tuple[int, ...], tuple[str, ...], bool]:
    """The pass's options, checked and normalised: ``(head_sizes, devices, strict)`` as tuples of
    ints, of device type names, and a bool. A bad one raises a ``ValueError`` naming it."""
    return validate_head_sizes(head_sizes), validate_devices(devices), validate_strict(strict)


# --------------------------------------------------------------------------------------------
# the backend's ``options`` dict


def inductor_config_keys() -> frozenset[str] | None:
    """Every key ``torch._inductor.config.patch`` accepts (nested ones dotted, as
    "triton.cudagraphs"), or None where this torch does not say (then nothing is checked)."""
    from torch._inductor import config

    keys = getattr(config, "_config", None)  # the ConfigModule's entries, aliases included
    if isinstance(keys, Mapping) and keys:
        return frozenset(keys)
    try:
        return frozenset(config.get_config_copy())
    except Exception:  # noqa: BLE001  (an older or changed torch: skip the check)
        return None


def split_and_validate_backend_options(
    options: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(pass options, Inductor config patches)`` from torch.compile's ``options`` dict.

    The pass options given come back validated and normalised (tuples, bool), ready for
    ``FuseQKRopePass(**pass_options)`` (whose defaults are ``DEFAULT_HEAD_SIZES``,
    ``DEFAULT_DEVICES``, ``strict=False`` and ``skip_pairs_only_read_by_copies=True``; the
    extension passes take the ``SHARED_PASS_OPTIONS`` of them); every other key must be an
    Inductor config key. A bad
    option raises a ``ValueError`` that names it and, for a near miss, the right name."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(f"rope_compile `options` must be a dict, got {options!r} "
                         f"({type(options).__name__})")
    for key in options:
        if not isinstance(key, str):
            raise ValueError(f"rope_compile option {key!r}: option names must be str")
    inductor_keys = inductor_config_keys()
    if inductor_keys is not None:
        unknown = [k for k in options if k not in PASS_OPTIONS and k not in inductor_keys]
        if unknown:
            key = unknown[0]
            hint = did_you_mean(key, [*PASS_OPTIONS, *sorted(inductor_keys)])
            raise ValueError(
                f"rope_compile option `{key}`: unknown; it is neither a pass option "
                f"({', '.join(PASS_OPTIONS)}) nor a torch._inductor.config key{hint}")
    validators = {"head_sizes": validate_head_sizes, "devices": validate_devices,
                  "strict": validate_strict,
                  "skip_pairs_only_read_by_copies": validate_skip_pairs_only_read_by_copies}
    pass_options = {k: validators[k](options[k]) for k in PASS_OPTIONS if k in options}
    patches = {k: v for k, v in options.items() if k not in PASS_OPTIONS}
    return pass_options, patches


# --------------------------------------------------------------------------------------------
# RotaryEmbedding's constructor


def _positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or operator.index(value) <= 0:
        raise ValueError(f"{_MODULE_PREFIX} `{name}`: must be a positive int, got {value!r} "
                         f"({type(value).__name__})")
    return operator.index(value)


def validate_rotary_embedding_args(
    head_size: Any,
    rotary_dim: Any,
    max_position_embeddings: Any,
    base: Any,
    is_neox_style: Any,
    dtype: Any,
) -> tuple[int, int, int, numbers.Real, bool, torch.dtype]:
    """``RotaryEmbedding``'s constructor arguments, checked: ints come back as plain ints."""
    head_size = _positive_int("head_size", head_size)
    rotary_dim = _positive_int("rotary_dim", rotary_dim)
    if rotary_dim % 2:
        raise ValueError(f"{_MODULE_PREFIX} `rotary_dim`: must be even (the rotation pairs up "
                         f"elements), got {rotary_dim}")
    if rotary_dim > head_size:
        raise ValueError(f"{_MODULE_PREFIX} `rotary_dim`: must be <= `head_size` "
                         f"({head_size}), got {rotary_dim}")
    max_position_embeddings = _positive_int("max_position_embeddings", max_position_embeddings)
    if (isinstance(base, bool) or not isinstance(base, numbers.Real)
            or not math.isfinite(base) or base <= 0):
        raise ValueError(f"{_MODULE_PREFIX} `base`: must be a positive finite number, got "
                         f"{base!r} ({type(base).__name__})")
    if not isinstance(is_neox_style, bool):
        raise ValueError(f"{_MODULE_PREFIX} `is_neox_style`: must be a bool, got "
                         f"{is_neox_style!r} ({type(is_neox_style).__name__})")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{_MODULE_PREFIX} `dtype`: must be a floating torch.dtype (e.g. "
                         f"torch.bfloat16), got {dtype!r}")
    return head_size, rotary_dim, max_position_embeddings, base, is_neox_style, dtype

"""Bad arguments raise an error naming the argument: eagerly, from the fake implementation
(under FakeTensorMode) and at trace time under torch.compile. Positions out of range raise
IndexError on CPU always, and on GPU kernels when ``set_check_positions(True)``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import FUSED_OP, GENERIC_OP, make_qkv
from torch._subclasses.fake_tensor import FakeTensorMode

import rope_compile
from rope_compile import ops, validation
from rope_compile.validation import check_positions_on_device_enabled

T, HQ, HK, D, ROT, P = 5, 2, 1, 128, 64, 32


def _g():
    return torch.Generator().manual_seed(0)


def fused_args(**changes) -> tuple:
    """Valid fused-op arguments (q, k: [..., :ROT] slices of one qkv buffer), with changes."""
    q, k, _, _ = make_qkv(T, HQ, HK, D, torch.bfloat16, generator=_g())
    args = {
        "q": q[..., :ROT],
        "k": k[..., :ROT],
        "cos_sin_cache": rope_compile.compute_cos_sin_cache(ROT, P),
        "positions": torch.arange(T) * 3,
        "rotary_dim": ROT,
        "is_neox": True,
    }
    args.update(changes)
    return tuple(args.values())


def generic_args(**changes) -> tuple:
    """Valid rotary_embedding arguments (query/key: [T, H * D] views of one qkv buffer)."""
    _, _, _, qkv = make_qkv(T, HQ, HK, D, torch.bfloat16, generator=_g())
    args = {
        "positions": torch.arange(T) * 3,
        "query": qkv[:, : HQ * D],
        "key": qkv[:, HQ * D : (HQ + HK) * D],
        "head_size": D,
        "cos_sin_cache": rope_compile.compute_cos_sin_cache(ROT, P),
        "is_neox": False,
    }
    args.update(changes)
    return tuple(args.values())


def _rand(*shape, dtype=torch.bfloat16, device="cpu"):
    return torch.randn(*shape, generator=_g()).to(dtype).to(device)


def _meta(x: torch.Tensor) -> torch.Tensor:
    """The same tensor (shape, strides, dtype) on another device."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def _q():
    return fused_args()[0]


def _k():
    return fused_args()[1]


@dataclass
class Bad:
    id: str
    op: str  # "fused" or "generic"
    make: Callable[[], tuple]
    match: str  # regex searched in the message: names the argument


BAD = [
    # ---- fused op
    Bad("rotary_dim-odd", "fused", lambda: fused_args(rotary_dim=63), "rotary_dim must be"),
    Bad("rotary_dim-zero", "fused",
        lambda: fused_args(rotary_dim=0, cos_sin_cache=_rand(P, 0, dtype=torch.float32)),
        "rotary_dim must be"),
    Bad("rotary_dim-negative", "fused", lambda: fused_args(rotary_dim=-2), "rotary_dim must be"),
    Bad("rotary_dim-gt-last-dim", "fused",
        lambda: fused_args(rotary_dim=66, cos_sin_cache=_rand(P, 66, dtype=torch.float32)),
        r"rotary_dim \(66\) must not exceed"),
    Bad("cache-last-dim", "fused",
        lambda: fused_args(cos_sin_cache=_rand(P, 2 * ROT, dtype=torch.float32)),
        "cos_sin_cache must be"),
    Bad("cache-1d", "fused", lambda: fused_args(cos_sin_cache=_rand(P * ROT)),
        "cos_sin_cache must be"),
    Bad("cache-int", "fused",
        lambda: fused_args(cos_sin_cache=torch.ones(P, ROT, dtype=torch.int32)),
        "cos_sin_cache must be floating point"),
    Bad("q-other-device", "fused", lambda: fused_args(q=_meta(_q())), "one device"),
    Bad("k-other-device", "fused", lambda: fused_args(k=_meta(_k())), "one device"),
    Bad("cache-other-device", "fused",
        lambda: fused_args(cos_sin_cache=_meta(fused_args()[2])), "one device"),
    Bad("positions-other-device", "fused",
        lambda: fused_args(positions=_meta(torch.arange(T))), "one device"),
    Bad("qk-dtypes", "fused", lambda: fused_args(k=_k().half()),
        "q and k must have the same dtype"),
    Bad("q-int", "fused",
        lambda: fused_args(q=torch.ones(T, HQ, ROT, dtype=torch.int32),
                           k=torch.ones(T, HK, ROT, dtype=torch.int32)),
        "q must be a floating-point"),
    Bad("k-int", "fused", lambda: fused_args(k=torch.ones(T, HK, ROT, dtype=torch.int16)),
        "k must be a floating-point"),
    Bad("positions-float", "fused", lambda: fused_args(positions=torch.arange(T).float()),
        "positions must be int32 or int64"),
    Bad("positions-int16", "fused",
        lambda: fused_args(positions=torch.arange(T, dtype=torch.int16)),
        "positions must be int32 or int64"),
    Bad("positions-length", "fused", lambda: fused_args(positions=torch.arange(T + 1)),
        "positions must hold one position per token"),
    Bad("positions-2d", "fused", lambda: fused_args(positions=torch.arange(T).view(T, 1)),
        "positions must be 1-D"),
    Bad("q-last-stride", "fused", lambda: fused_args(q=_rand(T, HQ, 2 * ROT)[..., ::2]),
        "q must have last stride 1"),
    Bad("k-last-stride", "fused", lambda: fused_args(k=_rand(T, HK, 2 * ROT)[..., ::2]),
        "k must have last stride 1"),
    Bad("qk-tokens", "fused", lambda: fused_args(k=_k()[1:]),
        "q and k must have the same number of tokens"),
    Bad("q-2d", "fused", lambda: fused_args(q=_rand(T, HQ * ROT)),
        r"q must be \[num_tokens, num_heads"),
    # ---- generic op
    Bad("g-head_size-not-dividing-query", "generic", lambda: generic_args(head_size=96),
        "query of shape .* must end in a multiple of head_size"),
    Bad("g-head_size-not-dividing-key", "generic",
        lambda: generic_args(query=_rand(T, 3 * 64), key=_rand(T, 96), head_size=64),
        "key of shape .* must end in a multiple of head_size"),
    Bad("g-head_size-zero", "generic", lambda: generic_args(head_size=0),
        "head_size must be a positive integer"),
    Bad("g-rotary_dim-odd", "generic",
        lambda: generic_args(cos_sin_cache=_rand(P, 63, dtype=torch.float32)),
        "rotary_dim must be"),
    Bad("g-rotary_dim-zero", "generic",
        lambda: generic_args(cos_sin_cache=_rand(P, 0, dtype=torch.float32)),
        "rotary_dim must be"),
    Bad("g-rotary_dim-gt-head_size", "generic",
        lambda: generic_args(cos_sin_cache=_rand(P, D + 2, dtype=torch.float32)),
        r"rotary_dim \(130\) must not exceed the head size \(128\)"),
    Bad("g-cache-1d", "generic", lambda: generic_args(cos_sin_cache=_rand(P * ROT)),
        "cos_sin_cache must be"),
    Bad("g-query-other-device", "generic", lambda: generic_args(query=_meta(_rand(T, HQ * D))),
        "one device"),
    Bad("g-key-other-device", "generic", lambda: generic_args(key=_meta(_rand(T, HK * D))),
        "one device"),
    Bad("g-cache-other-device", "generic",
        lambda: generic_args(cos_sin_cache=_meta(_rand(P, ROT))), "one device"),
    Bad("g-positions-other-device", "generic",
        lambda: generic_args(positions=_meta(torch.arange(T))), "one device"),
    Bad("g-dtypes", "generic", lambda: generic_args(key=_rand(T, HK * D, dtype=torch.float16)),
        "query and key must have the same dtype"),
    Bad("g-query-int", "generic",
        lambda: generic_args(query=torch.ones(T, HQ * D, dtype=torch.int64),
                             key=torch.ones(T, HK * D, dtype=torch.int64)),
        "query must be a floating-point"),
    Bad("g-positions-float", "generic", lambda: generic_args(positions=torch.zeros(T)),
        "positions must be int32 or int64"),
    Bad("g-positions-length", "generic", lambda: generic_args(positions=torch.arange(T - 1)),
        r"query of shape \(5, 256\) does not hold 4 tokens \(positions.numel\(\)\)"),
    Bad("g-query-last-stride", "generic", lambda: generic_args(query=_rand(T, 2 * HQ * D)[:, ::2]),
        "query must have last stride 1"),
    Bad("g-key-tokens", "generic", lambda: generic_args(key=_rand(T - 1, HK * D)),
        "key of shape .* does not hold 5 tokens"),
]

BAD_PARAMS = [pytest.param(b, id=b.id) for b in BAD]
ENTRIES = {
    "fused": {"op": FUSED_OP, "public": rope_compile.fused_qk_rope_with_cos_sin_cache_inplace},
    "generic": {"op": GENERIC_OP, "public": rope_compile.rotary_embedding},
}


def _snapshot(args):
    return [a.clone() for a in args if isinstance(a, torch.Tensor) and a.device.type == "cpu"]


@pytest.mark.parametrize("entry", ["op", "public"])
@pytest.mark.parametrize("bad", BAD_PARAMS)
def test_eager_raises(bad, entry):
    args = bad.make()
    before = _snapshot(args)
    with pytest.raises(ValueError, match=bad.match):
        ENTRIES[bad.op][entry](*args)
    # Validation happens before any write.
    for a, b in zip(_snapshot(args), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", BAD_PARAMS)
def test_fake_impl_raises(bad):
    mode = FakeTensorMode()
    args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bad.make()]
    with mode, pytest.raises(ValueError, match=bad.match):
        ENTRIES[bad.op]["op"](*args)


@pytest.mark.parametrize("bad", BAD_PARAMS)
def test_compile_raises_at_trace_time(bad):
    torch._dynamo.reset()
    args = bad.make()
    tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    public = ENTRIES[bad.op]["public"]

    def f(*tensors):
        full = list(args)
        for i, t in zip(tensor_at, tensors, strict=True):
            full[i] = t
        public(*full)

    # Raised while tracing (dynamo wraps it), not by the kernel when the compiled code runs.
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match=bad.match) as info:
        torch.compile(f, backend="aot_eager", fullgraph=True)(*[args[i] for i in tensor_at])
    assert isinstance(info.value, RuntimeError)
    assert "ValueError" in str(info.value)  # dynamo reports the fake implementation's error


def test_valid_arguments_pass_everywhere():
    """The bad cases above differ from these valid ones only in the named argument."""
    for op, make in (("fused", fused_args), ("generic", generic_args)):
        for entry in ("op", "public"):
            ENTRIES[op][entry](*make())
        mode = FakeTensorMode()
        with mode:
            ENTRIES[op]["op"](*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                for a in make()])
        torch._dynamo.reset()
        torch.compile(lambda *a, op=op: ENTRIES[op]["public"](*a), backend="aot_eager",
                      fullgraph=True)(*make())


# ---------------------------------------------------------------------------------------------
# positions out of range


def _with_positions(op, positions):
    if op == "fused":
        return fused_args(positions=positions)
    return generic_args(positions=positions)


@pytest.mark.parametrize("check_flag", [False, True])
@pytest.mark.parametrize("op", ["fused", "generic"])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bad_value", [-1, P, 10**6])
def test_cpu_positions_out_of_range_raise(op, pos_dtype, bad_value, check_flag,
                                          restore_check_positions):
    rope_compile.set_check_positions(check_flag)
    positions = torch.arange(T).to(pos_dtype)
    positions[3] = bad_value
    args = _with_positions(op, positions)
    before = _snapshot(args)
    for entry in ("op", "public"):
        with pytest.raises(IndexError, match=rf"positions must lie in \[0, {P}\)"):
            ENTRIES[op][entry](*args)
    for a, b in zip(_snapshot(args), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["fused", "generic"])
def test_positions_at_the_ends_are_valid(op):
    positions = torch.tensor([0, P - 1, 1, P - 2, 0])
    ENTRIES[op]["public"](*_with_positions(op, positions))


@pytest.mark.parametrize("op", ["fused", "generic"])
def test_fake_impl_reads_no_positions(op, restore_check_positions):
    """The range check reads data, so the fake implementation does not do it."""
    rope_compile.set_check_positions(True)
    positions = torch.full((T,), P + 5)
    mode = FakeTensorMode()
    args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
            for a in _with_positions(op, positions)]
    with mode:
        ENTRIES[op]["op"](*args)


def test_set_check_positions_toggles(restore_check_positions):
    rope_compile.set_check_positions(True)
    assert check_positions_on_device_enabled() is True
    rope_compile.set_check_positions(False)
    assert check_positions_on_device_enabled() is False
    rope_compile.set_check_positions(1)
    assert check_positions_on_device_enabled() is True


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False), (None, False)])
def test_check_positions_environment_variable(value, expected, monkeypatch,
                                              restore_check_positions):
    """ROPE_COMPILE_CHECK_POSITIONS=1 at import enables the check (module reloaded here)."""
    if value is None:
        monkeypatch.delenv("ROPE_COMPILE_CHECK_POSITIONS", raising=False)
    else:
        monkeypatch.setenv("ROPE_COMPILE_CHECK_POSITIONS", value)
    try:
        importlib.reload(validation)
        assert validation.check_positions_on_device_enabled() is expected
        # The ops read the same flag.
        assert ops.check_positions_on_device_enabled() is expected
    finally:
        monkeypatch.undo()
        importlib.reload(validation)

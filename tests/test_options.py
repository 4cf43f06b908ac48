"""Bad options fail at once with a ``ValueError`` that names the option (and, for a near miss,
suggests the right name): the backend's ``options``, the pass's options, ``RotaryEmbedding``'s
arguments. Good ones still work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pass_helpers import (
    QKVRope,
    count_fused_calls,
    fresh_compile,
    positions_for,
    rope_counters,
    tokens,
)
from torch._inductor.utils import run_and_get_code

from rope_compile import FUSED_HEAD_SIZES, RotaryEmbedding
from rope_compile.backend import rope_compile_backend
from rope_compile.options import (
    DEFAULT_DEVICES,
    DEFAULT_HEAD_SIZES,
    GPU_DEVICE_TYPES,
    KNOWN_DEVICE_TYPES,
    PASS_OPTIONS,
    SHARED_PASS_OPTIONS,
    inductor_config_keys,
    split_and_validate_backend_options,
    validate_pass_options,
    validate_rotary_embedding_args,
)

T = 5


def _identity_gm() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(torch.nn.Identity())


def _compile_error(options) -> ValueError:
    """The ValueError a compiled function's first call raises for these ``options``: dynamo wraps
    it in ``BackendCompilerFailed``, whose message carries the original one."""
    def f(x):
        return x * 2

    with fresh_compile(), pytest.raises(Exception) as info:
        torch.compile(f, backend="rope_compile", options=options)(torch.ones(3))
    err = info.value
    inner = getattr(err, "inner_exception", None) or err.__cause__ or err
    assert isinstance(inner, ValueError), repr(err)
    assert str(inner) in str(err)  # the user sees the same message
    return inner


# (options, what the message must say). Each is a mistake that used to fail late, with a raw
# error, or not at all.
BAD_BACKEND_OPTIONS = {
    "pass-option-typo": ({"head_size": (128,)}, ["`head_size`", "'head_sizes'"]),
    "pass-option-case": ({"Devices": ("cpu",)}, ["`Devices`", "'devices'"]),
    "inductor-typo": ({"max_autotun": False}, ["`max_autotun`", "'max_autotune'"]),
    "inductor-dotted-typo": ({"triton.cudagraph": False},
                             ["`triton.cudagraph`", "'triton.cudagraphs'"]),
    "unknown-no-hint": ({"zzqqxx": 1}, ["`zzqqxx`", "torch._inductor.config"]),
    "device-gpu": ({"devices": ("gpu",)}, ["`devices`", "'gpu'", "'xpu', 'cuda'"]),
    "device-typo": ({"devices": ("cdua",)}, ["`devices`", "'cdua'", "'cuda'"]),
    "device-index": ({"devices": ("cuda:0",)}, ["`devices`", "'cuda:0'", "did you mean 'cuda'"]),
    "device-upper": ({"devices": ("CPU",)}, ["`devices`", "did you mean 'cpu'?"]),
    "device-bare-str": ({"devices": "cpu"}, ["`devices`", "bare str", "('cpu',)"]),
    "device-empty": ({"devices": ()}, ["`devices`", "empty"]),
    "device-not-str": ({"devices": (0,)}, ["`devices`", "0 (int)"]),
    "head-sizes-int": ({"head_sizes": 128}, ["`head_sizes`", "positive even ints", "(128,)"]),
    "head-sizes-empty": ({"head_sizes": ()}, ["`head_sizes`", "empty"]),
    "head-sizes-odd": ({"head_sizes": (128, 127)}, ["`head_sizes`", "127"]),
    "head-sizes-zero": ({"head_sizes": (0,)}, ["`head_sizes`", "entry 0"]),
    "head-sizes-negative": ({"head_sizes": (-128,)}, ["`head_sizes`", "-128"]),
    "head-sizes-bool": ({"head_sizes": (True,)}, ["`head_sizes`", "True (bool)"]),
    "head-sizes-float": ({"head_sizes": (128.0,)}, ["`head_sizes`", "128.0 (float)"]),
    "head-sizes-str": ({"head_sizes": "128"}, ["`head_sizes`", "'128'"]),
    "strict-int": ({"strict": 1}, ["`strict`", "bool"]),
    "strict-str": ({"strict": "yes"}, ["`strict`", "bool"]),
}


@pytest.mark.parametrize("options,expected", list(BAD_BACKEND_OPTIONS.values()),
                         ids=list(BAD_BACKEND_OPTIONS))
def test_bad_backend_option_called_directly(options, expected):
    with pytest.raises(ValueError) as info:
        rope_compile_backend(_identity_gm(), [], options=options)
    for text in expected:
        assert text in str(info.value)


@pytest.mark.parametrize("name", ["pass-option-typo", "inductor-dotted-typo", "device-gpu",
                                  "device-bare-str", "head-sizes-int", "strict-int"])
def test_bad_backend_option_fails_at_first_call(name):
    options, expected = BAD_BACKEND_OPTIONS[name]
    err = _compile_error(options)
    for text in expected:
        assert text in str(err)


def test_bad_option_fails_before_compiling(monkeypatch):
    """Nothing reaches Inductor (nor registers anything) when an option is bad."""
    import torch._inductor.compile_fx as compile_fx_module

    import rope_compile.inductor_lowering as lowering

    called = []
    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda *a, **k: called.append(a))
    monkeypatch.setattr(lowering, "register_inductor_lowering", lambda: called.append("lowering"))
    with pytest.raises(ValueError, match="head_sizes"):
        rope_compile_backend(_identity_gm(), [], options={"head_size": (128,)})
    assert called == []


def test_options_must_be_a_dict():
    with pytest.raises(ValueError, match="`options` must be a dict"):
        split_and_validate_backend_options([("devices", ("cpu",))])
    with pytest.raises(ValueError, match="names must be str"):
        split_and_validate_backend_options({1: 2})


# --------------------------------------------------------------------------------------------
# good options still work


@pytest.mark.parametrize("patch", [{"max_autotune": False}, {"triton.cudagraphs": False},
                                   {"cpp.simdlen": 0}, {"force_disable_caches": True}],
                         ids=["max_autotune", "triton.cudagraphs", "cpp.simdlen", "alias"])
def test_inductor_patches_pass_through(monkeypatch, patch):
    import torch._inductor.compile_fx as compile_fx_module

    seen = {}
    monkeypatch.setattr(compile_fx_module, "compile_fx",
                        lambda gm, inputs, config_patches: seen.update(config_patches))
    rope_compile_backend(_identity_gm(), [], options={"devices": ("cpu",), **patch})
    for key, value in patch.items():
        assert seen[key] == value


def test_every_inductor_key_is_accepted():
    keys = inductor_config_keys()
    assert keys is not None and "triton.cudagraphs" in keys and "max_autotune" in keys
    assert set(torch._inductor.list_options()) <= keys
    options = {key: None for key in keys}
    _, patches = split_and_validate_backend_options(options)
    assert patches.keys() == keys


def test_split_normalises_pass_options():
    pass_options, patches = split_and_validate_backend_options(
        {"head_sizes": [np.int64(64), 128], "devices": [torch.device("cpu"), "cuda"],
         "strict": True, "max_autotune": False})
    assert pass_options == {"head_sizes": (64, 128), "devices": ("cpu", "cuda"), "strict": True}
    assert type(pass_options["head_sizes"][0]) is int
    assert patches == {"max_autotune": False}
    assert split_and_validate_backend_options(None) == ({}, {})
    assert split_and_validate_backend_options({}) == ({}, {})


@pytest.mark.parametrize("options", [{"devices": ("cpu",), "head_sizes": (64, 128)},
                                     {"devices": ("cpu",), "max_autotune": False},
                                     {"devices": ("cpu",), "triton.cudagraphs": False}],
                         ids=["head_sizes", "max_autotune", "triton.cudagraphs"])
def test_good_options_compile_and_rewrite(options):
    model = QKVRope()  # head size 128
    inputs = (positions_for(T), tokens(T))
    with torch.no_grad():
        expected = model(*inputs)
    with fresh_compile():
        out, codes = run_and_get_code(
            torch.compile(model, backend="rope_compile", options=options), *inputs)
        counts = rope_counters()
    assert counts == {"pairs_found": 1, "rewritten": 1}
    assert count_fused_calls("\n".join(codes)) == 1
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# validate_pass_options (FuseQKRopePass's options)


def test_constants():
    assert DEFAULT_HEAD_SIZES == FUSED_HEAD_SIZES == (128, 256, 512)
    assert DEFAULT_DEVICES == GPU_DEVICE_TYPES == ("xpu", "cuda")
    assert set(KNOWN_DEVICE_TYPES) == {"cpu", "cuda", "xpu"}
    assert PASS_OPTIONS == ("head_sizes", "devices", "strict", "skip_pairs_only_read_by_copies")
    assert SHARED_PASS_OPTIONS == ("head_sizes", "devices", "strict")  # the extensions take


def test_validate_pass_options_good():
    assert validate_pass_options(DEFAULT_HEAD_SIZES, DEFAULT_DEVICES, False) == (
        (128, 256, 512), ("xpu", "cuda"), False)
    assert validate_pass_options([64], ["cpu"], True) == ((64,), ("cpu",), True)
    assert validate_pass_options(range(64, 129, 64), (d for d in ["cpu"]), False) == (
        (64, 128), ("cpu",), False)


@pytest.mark.parametrize("args,expected", [
    ((128, ("cpu",), False), ["FuseQKRopePass", "`head_sizes`", "(128,)"]),
    (((128,), "cpu", False), ["FuseQKRopePass", "`devices`", "('cpu',)"]),
    (((128,), torch.device("cpu"), False), ["`devices`", "('cpu',)"]),
    (((128,), ("gpu",), False), ["`devices`", "'gpu'", "GPU device types"]),
    (((128,), (torch.device("cuda", 0),), False), ["`devices`", "did you mean 'cuda'"]),
    (((128,), None, False), ["`devices`", "None"]),
    ((None, ("cpu",), False), ["`head_sizes`", "None"]),
    (((128,), ("cpu",), None), ["`strict`", "None"]),
    (((128,), ("cpu",), np.bool_(True)), ["`strict`", "bool"]),
], ids=["head-int", "devices-str", "devices-device", "not-a-type", "device-index", "devices-none",
        "head-none", "strict-none", "strict-numpy"])
def test_validate_pass_options_bad(args, expected):
    with pytest.raises(ValueError) as info:
        validate_pass_options(*args)
    for text in expected:
        assert text in str(info.value)


# --------------------------------------------------------------------------------------------
# RotaryEmbedding


GOOD_ROPE = dict(head_size=128, rotary_dim=64, max_position_embeddings=64, base=10000.0,
                 is_neox_style=True, dtype=torch.float32)


@pytest.mark.parametrize("change,expected", [
    ({"rotary_dim": 127}, ["`rotary_dim`", "even", "127"]),
    ({"rotary_dim": 256}, ["`rotary_dim`", "<= `head_size` (128)", "256"]),
    ({"rotary_dim": 0}, ["`rotary_dim`", "positive"]),
    ({"rotary_dim": 64.0}, ["`rotary_dim`", "64.0 (float)"]),
    ({"head_size": 0}, ["`head_size`", "positive int"]),
    ({"head_size": True}, ["`head_size`", "True (bool)"]),
    ({"head_size": "128"}, ["`head_size`", "'128'"]),
    ({"max_position_embeddings": 0}, ["`max_position_embeddings`", "positive int"]),
    ({"max_position_embeddings": 64.5}, ["`max_position_embeddings`", "64.5"]),
    ({"base": 0.0}, ["`base`", "positive"]),
    ({"base": -1}, ["`base`", "positive"]),
    ({"base": float("inf")}, ["`base`", "finite"]),
    ({"base": "10000"}, ["`base`", "'10000'"]),
    ({"base": True}, ["`base`", "True"]),
    ({"is_neox_style": 1}, ["`is_neox_style`", "bool"]),
    ({"is_neox_style": "neox"}, ["`is_neox_style`", "bool"]),
    ({"dtype": torch.int32}, ["`dtype`", "floating", "torch.int32"]),
    ({"dtype": "bfloat16"}, ["`dtype`", "floating", "'bfloat16'"]),
], ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_rotary_embedding_bad_args(change, expected):
    with pytest.raises(ValueError) as info:
        RotaryEmbedding(**{**GOOD_ROPE, **change})
    message = str(info.value)
    assert message.startswith("RotaryEmbedding argument `")
    for text in expected:
        assert text in message


def test_rotary_embedding_good_args():
    m = RotaryEmbedding(**GOOD_ROPE)
    assert (m.head_size, m.rotary_dim, m.max_position_embeddings) == (128, 64, 64)
    assert m.cos_sin_cache.shape == (64, 64)
    # int-likes are accepted (numpy, a HF config's int base), and stored as plain ints
    m = RotaryEmbedding(np.int64(128), np.int32(128), 32, 500000, False, torch.bfloat16)
    assert type(m.head_size) is int and type(m.rotary_dim) is int
    assert m.cos_sin_cache.shape == (32, 128)
    assert validate_rotary_embedding_args(64, 32, 16, 1e4, True, torch.float16) == (
        64, 32, 16, 1e4, True, torch.float16)

"""The kernels' fp32 roundings and square root (``rope_compile/kernels/fp32_rounding.py``)
against torch's IEEE conversions and sqrt, through Triton's interpreter (CPU) or compiled
(``gpu``): bit for bit, ties, subnormals, overflow and specials included."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import GPU_DEVICE

from rope_compile.kernels.fp32_rounding import fp32_value, nearest_root, round_to, sqrt_rn

BLOCK = 1024


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, round_to(x, DTYPE), mask=offs < n)


@triton.jit
def _sqrt_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
    tl.store(out_ptr + offs, sqrt_rn(x), mask=offs < n)


@triton.jit
def _nearest_root_kernel(x_ptr, guess_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
    y = tl.load(guess_ptr + offs, mask=offs < n, other=1.0)
    tl.store(out_ptr + offs, nearest_root(x, y), mask=offs < n)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def _interesting_floats(device, n=1 << 13, seed=0) -> torch.Tensor:
    """Random fp32 bit patterns (every exponent), bf16/fp16 ties and their neighbours, fp16's
    subnormal and overflow edges, specials."""
    gen = torch.Generator().manual_seed(seed)
    random_bits = torch.randint(-2**31, 2**31, (n,), generator=gen, dtype=torch.int64)
    random = random_bits.to(torch.int32).view(torch.float32)
    moderate = torch.randn(n, generator=gen) * torch.exp2(
        torch.randint(-30, 20, (n,), generator=gen).float())
    base = torch.randint(0, 2**31, (n // 4,), generator=gen, dtype=torch.int64).to(torch.int32)
    ties = torch.cat([(base & ~0xFFFF) | 0x8000, (base & ~0x1FFF) | 0x1000])  # bf16, fp16 ties
    ties = torch.cat([ties - 1, ties, ties + 1]).view(torch.float32)
    edges = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.99,
                          65520.0, 65536.0, 2**-14, 2**-24, 2**-25, 1.5 * 2**-25, 2**-26,
                          3 * 2**-25, 2**-14 - 2**-25, 2**-149, 2**-126, 3.4028235e38])
    x = torch.cat([random, moderate, ties, edges, -edges])
    return x.to(device)


def _run_round(x, dtype):
    out = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(),
                                                    {torch.bfloat16: tl.bfloat16,
                                                     torch.float16: tl.float16,
                                                     torch.float32: tl.float32}[dtype],
                                                    BLOCK=BLOCK)
    return out


def _correct_sqrt(x: torch.Tensor) -> torch.Tensor:
    """IEEE's correctly rounded fp32 root: the fp64 root rounded to fp32 (fp64 has more than
    2 * 24 + 2 bits, so the two roundings give the correctly rounded one). Not torch.sqrt on
    fp32 CPU tensors, whose vectorised root can be an ulp off (seen: sqrt of 0x5ba252fb)."""
    return torch.sqrt(x.double()).float()


def _same_bits_or_both_nan(got, want):
    nan = got.isnan() & want.isnan()
    return bool((nan | (_bits(got) == _bits(want))).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_to_is_torch_conversion(dtype):
    x = _interesting_floats(GPU_DEVICE or "cpu")
    got = _run_round(x, dtype)
    assert _same_bits_or_both_nan(got, x.to(dtype).float())


def test_sqrt_rn_is_correctly_rounded():
    x = _interesting_floats(GPU_DEVICE or "cpu").abs()
    x = torch.cat([x, torch.exp2(torch.linspace(-149, 127, 4096, device=x.device)),
                   -x[:64], torch.tensor([-0.0], device=x.device)])
    out = torch.empty_like(x)
    _sqrt_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), BLOCK=BLOCK)
    assert _same_bits_or_both_nan(out, _correct_sqrt(x))


@pytest.mark.parametrize("off", [-4, -3, -1, 1, 2, 4])
def test_nearest_root_corrects_a_guess_ulps_off(off):
    """Every fp32 of one even binade and the next ([1, 4): all the roots' rounding cases, up
    to the exact 2^k scaling of sqrt), sampled; the guess ``off`` ulps from the root."""
    step = 1 if GPU_DEVICE else 509  # all 2^24 on a GPU, a stride of them under the interpreter
    bits = torch.arange(0x3F800000, 0x40800000, step, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).to(GPU_DEVICE or "cpu")
    want = _correct_sqrt(x)
    guess = (_bits(want) + off).view(torch.float32)
    out = torch.empty_like(x)
    _nearest_root_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, guess, out, x.numel(),
                                                           BLOCK=BLOCK)
    assert torch.equal(_bits(out), _bits(want))


def test_fp32_value_is_torch_conversion():
    """The host-side rounding of float kernel arguments is the fp64 -> fp32 conversion the
    kernel's own cast would do (so an fp64-typed argument, as Inductor passes floats on
    devices with fp64, computes with the same fp32 value), overflow to inf included."""
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(10000, generator=gen, dtype=torch.float64)
              * torch.exp2(torch.randint(-160, 140, (10000,), generator=gen).double()))
    values = torch.cat([values, torch.tensor([1e-6, 1e-5, 0.1, 3.4028235677973366e38,
                                              3.4028235677973366e38 * (1 + 2**-30),
                                              3.4028236692093846e38, -1e39, 2**-150,
                                              1.5 * 2**-149], dtype=torch.float64)])
    for v in values.tolist():
        want = torch.tensor(v, dtype=torch.float64).float().item()
        got = fp32_value(v)
        assert got == want or (math.isnan(got) and math.isnan(want)), v
        assert fp32_value(got) == got
    sym = object()
    assert fp32_value(sym) is sym

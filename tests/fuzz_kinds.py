"""What the soundness fuzzers (``fuzz_layouts.py``, ``fuzz_prologue.py``) draw besides the layout
and the prologue: the readers of the rotated q/k, the spelling of the matched arithmetic, and the
indices (cache rows, positions) the program uses.

Readers (:data:`READERS`), each applied to the rotated q or k (``x``, ``[T, H, D]`` or
``[B, H, S, D]``; normed too in the prologue):

* every aten view op (:data:`VIEW_READERS`: ``view``, ``reshape``, ``permute``, ``transpose``,
  ``slice``, ``select``, ``unsqueeze``, ``squeeze``, ``expand``, ``split``, ``unbind``,
  ``narrow``, ``movedim``, ``unflatten``, ``diagonal``, ``unfold``, ``view(dtype)`` (an integer
  dtype of the same size and back), ``t``, ``as_strided`` (rows at an offset, and an
  overlapping window)), whose result is then used as :data:`READER_USES` says: returned, read by
  a pointwise op, a matmul, or attention;
* ``custom_op``: a user's in-place op (``torch.library.custom_op(..., mutates_args=("x",))``,
  :func:`negate_scale_`) on a view of ``x`` (:data:`CUSTOM_OP_VIEWS`), after which the program
  reads ``x`` on (returned, attention, a cache store already made).

The passes must keep each reader's meaning (``passes/readers.py``: layout-dependent readers get a
copy in the old layout); none changes what is rewritten.

Spellings (:data:`ROPE_SPELLINGS`, :data:`NORM_SPELLINGS`, :data:`STORE_SPELLINGS`) of the
arithmetic the matchers accept: keyword arguments (``torch.add(input=.., other=..)``,
``mean(dim=-1, keepdim=True)``, ``.to(dtype=..)``), ``alpha=1``, methods, ``out=`` buffers,
``torch.square`` / ``x * x`` for ``x.pow(2)``, ``(..).rsqrt()``, ``type_as``, ``mean(..,
dtype=float32)`` of a float32 x; and the ones that change the math, which must NOT be matched
(:data:`CHANGES_THE_MATH`): ``alpha != 1`` in the RoPE's sub or add, in the norm's ``var + eps``
or in Gemma's ``1 + w``.

Indices (:data:`INDEX_MODES`): all in range; some negative but in range (eager wraps them where
its op does: setitem, ``index_put_``, ``cache[positions]``; ``index_select``, ``embedding`` and
``index_copy_`` raise); one out of range (eager raises). Where eager raises, the compiled program
must raise too (on the CPU checking is always on); :func:`eager_raises` says which.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

# The draws of a program without any of these kinds (for hand-built and regression programs).
PLAIN = {"reader": "none", "second": False, "spelling": "plain", "gather": "index_select",
         "index_mode": "in_range"}


def without_kinds(program):
    """``program`` (a fuzz_layouts or fuzz_prologue program) with :data:`PLAIN` draws."""
    return replace(program, **PLAIN)


# --------------------------------------------------------------------------------------------
# readers

VIEW_READERS = ("view", "reshape", "permute", "transpose", "slice", "select", "unsqueeze",
                "squeeze", "expand", "split", "unbind", "narrow", "movedim", "unflatten",
                "diagonal", "unfold", "view_dtype", "t", "as_strided", "as_strided_overlap")
READERS = ("none", *VIEW_READERS, "custom_op")
READER_USES = ("returned", "pointwise", "matmul", "attention")
# The view of x the custom op mutates in place.
CUSTOM_OP_VIEWS = ("whole", "head", "half_dim", "transposed", "split_last")
CUSTOM_OP_FACTOR = -2.0  # exact in every dtype: a lost or doubled write shows


@torch.library.custom_op("rope_compile_fuzz::negate_scale_", mutates_args=("x",))
def negate_scale_(x: torch.Tensor, factor: float) -> None:
    """x *= factor, in place, through whatever strides x has."""
    x.mul_(factor)


@negate_scale_.register_fake
def _(x, factor):
    return None


def view_of(name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The views ``name`` takes of ``x`` (``x.dim() >= 3``, last dim D >= 64); each valid for
    any strides ``x`` has (a dim is split, never merged, except by ``reshape``)."""
    d = x.shape[-1]
    if name == "view":
        return [x.view(*x.shape[:-1], 2, d // 2)]
    if name == "reshape":
        return [x.reshape(-1, d)]
    if name == "permute":
        return [x.permute(*reversed(range(x.dim())))]
    if name == "transpose":
        return [x.transpose(0, 1)]
    if name == "slice":
        return [x[:, :1, ..., 8:]]
    if name == "select":
        return [x.select(-2, x.shape[-2] - 1)]
    if name == "unsqueeze":
        return [x.unsqueeze(1)]
    if name == "squeeze":
        return [x[:, :1].squeeze(1)]
    if name == "expand":
        return [x.unsqueeze(1).expand(-1, 2, *x.shape[1:])]
    if name == "split":
        return list(x.split(d // 4, -1)[1:3])
    if name == "unbind":
        return list(x.unbind(1))
    if name == "narrow":
        return [x.narrow(-1, 16, d // 2)]
    if name == "movedim":
        return [x.movedim(-1, 0)]
    if name == "unflatten":
        return [x.unflatten(-1, (4, d // 4))]
    if name == "diagonal":
        return [torch.diagonal(x, 0, -2, -1)]
    if name == "unfold":
        return [x.unfold(-1, 4, 3)]
    if name == "view_dtype":
        same_size = {4: torch.int32, 2: torch.int16, 8: torch.int64}[x.element_size()]
        return [x.view(same_size).view(x.dtype)]
    if name == "t":
        return [x[(0,) * (x.dim() - 2)].t()]
    if name == "as_strided":  # rows of x's storage from element 3, half a row each
        rows = max(x.numel() // d - 1, 1)
        return [x.as_strided((rows, d // 2), (d, 1), 3)]
    if name == "as_strided_overlap":
        return [x.as_strided((2, 8), (1, 2), 5)]
    raise ValueError(name)


# Known misses (no wrong value: a pair left to Inductor), labelled while open.
GPTJ_MUTATED = ("an in-place custom op on the rotated q or k of a full-rotary GPT-J RoPE: "
                "the op's base is the stack [.., D/2, 2] whose flatten is the rotated tensor, "
                "and the mutated RoPE is not recognised (the pair is left to Inductor)")


def gptj_mutated(form: str, is_neox: bool, rotary_dim: int, head_size: int,
                 reader: str) -> bool:
    """Whether a program hits :data:`GPTJ_MUTATED` (sglang GPT-J, full rotary, custom op)."""
    return (form == "sglang" and not is_neox and rotary_dim == head_size
            and reader == "custom_op")


def custom_op_view(name: str, x: torch.Tensor) -> torch.Tensor:
    """The view of ``x`` the custom op mutates."""
    d = x.shape[-1]
    if name == "whole":
        return x
    if name == "head":
        return x.select(1, 0)
    if name == "half_dim":
        return x[..., : d // 2]
    if name == "transposed":
        return x.transpose(0, 1)
    if name == "split_last":
        return x.view(*x.shape[:-1], 2, d // 2)[..., 1, :]
    raise ValueError(name)


def _matrix(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, v.shape[-1]) if v.dim() != 1 else v[None]


def use(views: list[torch.Tensor], how: str) -> list[torch.Tensor]:
    """The outputs of reading ``views`` as :data:`READER_USES` ``how`` says."""
    if how == "returned":
        return list(views)
    if how == "pointwise":
        return [v * 2.0 + 1.0 for v in views]
    if how == "matmul":  # (scaled: its rounding error does not grow with the width)
        return [_matrix(v) @ _matrix(v).transpose(0, 1) / v.shape[-1] for v in views]
    if how == "attention":
        return [F.scaled_dot_product_attention(*(v if v.dim() >= 2 else v[None],) * 3)
                for v in views]
    raise ValueError(how)


def read(x: torch.Tensor, reader: str, how: str, custom_view: str) -> list[torch.Tensor]:
    """Apply ``reader`` to ``x``: a view reader's outputs, or (``custom_op``) x mutated in
    place through one of its views and nothing returned (the caller reads x on)."""
    if reader == "none":
        return []
    if reader == "custom_op":
        negate_scale_(custom_op_view(custom_view, x), CUSTOM_OP_FACTOR)
        return []
    return use(view_of(reader, x), how)


# --------------------------------------------------------------------------------------------
# spellings

# sglang forward_native (o1 = x1 cos - x2 sin, o2 = x2 cos + x1 sin) and HF (q cos + rot(q) sin)
ROPE_SPELLINGS = ("plain", "keywords", "alpha_one", "methods", "out", "sub_alpha",
                  "add_alpha")
# the RMSNorm's steps (prologue)
NORM_SPELLINGS = ("square", "mul_self", "type_as", "method_rsqrt", "mean_dtype", "eps_alpha",
                  "gemma_alpha")
# the KV store's cast and scale (prologue): keywords and out= come with ROPE_SPELLINGS' names
STORE_SPELLINGS = ("keywords", "out")
# Non-default arguments that change the value: the match must fail.
CHANGES_THE_MATH = {
    "sub_alpha": "the RoPE's x1 cos - x2 sin spelled torch.sub(.., alpha=2.0)",
    "add_alpha": "the RoPE's sum spelled torch.add(.., alpha=0.5)",
    "eps_alpha": "the norm's var + eps spelled torch.add(var, eps, alpha=100.0)",
    "gemma_alpha": "Gemma's 1 + w spelled torch.add(w.float(), 1.0, alpha=3.0)",
}
ROPE_ALPHAS = {"sub_alpha": 2.0, "add_alpha": 0.5}


def _out(op, a, b):
    """``op(a, b, out=buf)`` into a fresh buffer of the broadcast shape, where a and b have one
    dtype or b is a Python number (``torch.result_type`` would break dynamo's graph)."""
    if isinstance(b, torch.Tensor):
        if a.dtype != b.dtype:
            return op(a, b)  # (a promoting op: no out= spelling of it here)
        shape = torch.broadcast_shapes(a.shape, b.shape)
    else:
        shape = a.shape
    buf = torch.empty(shape, dtype=a.dtype, device=a.device)
    op(a, b, out=buf)
    return buf


def mul(a, b, spelling: str):
    if spelling == "keywords":
        return torch.mul(input=a, other=b)
    if spelling == "methods":
        return a.mul(b)
    if spelling == "out":
        return _out(torch.mul, a, b)
    return a * b


def add(a, b, spelling: str, alpha: float | None = None):
    """a + alpha * b in the spelling (``alpha``: that alpha, spelled out)."""
    if alpha is not None:
        return torch.add(a, b, alpha=alpha)
    if spelling == "keywords":
        return torch.add(input=a, other=b)
    if spelling == "alpha_one":
        return torch.add(a, b, alpha=1)
    if spelling == "methods":
        return a.add(b)
    if spelling == "out":
        return _out(torch.add, a, b)
    return a + b


def sub(a, b, spelling: str, alpha: float | None = None):
    if alpha is not None:
        return torch.sub(a, b, alpha=alpha)
    if spelling == "keywords":
        return torch.sub(input=a, other=b)
    if spelling == "alpha_one":
        return torch.sub(a, b, alpha=1)
    if spelling == "methods":
        return a.sub(b)
    if spelling == "out":
        return _out(torch.sub, a, b)
    return a - b


def div(a, b, spelling: str):
    if spelling == "keywords":
        return torch.div(input=a, other=b)
    if spelling == "methods":
        return a.div(b)
    return a / b


def cast(x, dtype, spelling: str):
    if spelling == "keywords":
        return x.to(dtype=dtype)
    if spelling == "methods" and dtype == torch.float32:
        return x.float()
    return x.to(dtype)


def rms_normalised(xf, eps: float, spelling: str):
    """``xf * rsqrt(mean(xf^2, -1, keepdim) + eps)`` (float32) in the spelling."""
    if spelling == "square":
        sq = torch.square(xf)
    elif spelling == "mul_self":
        sq = xf * xf
    else:
        sq = xf.pow(2)
    if spelling == "keywords":
        var = sq.mean(dim=-1, keepdim=True)
    elif spelling == "mean_dtype":
        var = sq.mean(-1, keepdim=True, dtype=torch.float32)
    else:
        var = sq.mean(-1, keepdim=True)
    alpha = 100.0 if spelling == "eps_alpha" else None
    shifted = add(var, eps, spelling, alpha)
    if spelling == "method_rsqrt":
        r = shifted.rsqrt()
    elif spelling == "keywords":
        r = torch.rsqrt(input=shifted)
    else:
        r = torch.rsqrt(shifted)
    return mul(xf, r, spelling)


def gemma_factor(weight, spelling: str):
    """``1 + w.float()`` in the spelling (``gemma_alpha``: ``1 + 3 w``)."""
    wf = cast(weight, torch.float32, spelling)
    if spelling == "gemma_alpha":
        return torch.add(wf, 1.0, alpha=3.0)
    return 1.0 + wf if spelling == "plain" else add(wf, 1.0, spelling)


def round_to(x, like, spelling: str):
    """``x`` rounded to ``like``'s dtype: ``.to(dtype)``, ``.to(dtype=..)`` or ``type_as``."""
    if spelling == "type_as":
        return x.type_as(like)
    return cast(x, like.dtype, spelling)


# --------------------------------------------------------------------------------------------
# indices

INDEX_MODES = ("in_range", "negative", "out_of_range")
# How sglang's forward_native gathers the cos/sin rows at positions.
GATHERS = ("index_select", "getitem", "embedding")
# The ops that wrap a negative index like Python (the others raise).
WRAPPING = {"getitem", "setitem", "index_put_"}


def gather(cache, positions, how: str):
    if how == "getitem":
        return cache[positions]
    if how == "embedding":
        return F.embedding(positions, cache)
    return cache.index_select(0, positions)


def with_mode(index: torch.Tensor, size: int, mode: str, g: torch.Generator) -> torch.Tensor:
    """``index`` (in ``[0, size)``) with the mode applied: ``negative``: about half its entries
    (at least one) moved to ``entry - size``, the same rows; ``out_of_range``: one entry moved to
    ``size + r`` or ``-size - 1 - r``."""
    if mode == "in_range" or index.numel() == 0:
        return index
    index = index.clone()
    flat = index.view(-1)
    if mode == "negative":
        pick = torch.rand(flat.shape, generator=g) < 0.5
        pick[int(torch.randint(0, flat.numel(), (1,), generator=g))] = True
        flat[pick] -= size
        return index
    if mode == "out_of_range":
        at = int(torch.randint(0, flat.numel(), (1,), generator=g))
        r = int(torch.randint(0, 3, (1,), generator=g))
        flat[at] = size + r if torch.rand((), generator=g) < 0.5 else -size - 1 - r
        return index
    raise ValueError(mode)


def eager_raises(mode: str, op: str) -> bool:
    """Whether eager raises for indices of ``mode`` read or written by ``op`` (a name in
    :data:`GATHERS`, ``setitem``, ``index_put_`` or ``index_copy_``)."""
    return mode == "out_of_range" or (mode == "negative" and op not in WRAPPING)


# What a compiled program's error may be where eager raises: an error of the run, never of
# the compile (message prefixes of fuzz_layouts._run_compiled).
COMPILE_ERRORS = ("BackendCompilerFailed", "InternalTorchDynamoError", "Unsupported",
                  "TorchRuntimeError", "LoweringException", "InductorError")


def is_run_error(message: str | None) -> bool:
    return message is not None and not message.startswith(COMPILE_ERRORS)


def kind_labels(program, index_on: str) -> list[str]:
    """The draws of this module in a program's ``describe()`` (the default ones left out):
    reader, second RoPE, spelling, gather and index mode (``index_on`` names the index)."""
    found = []
    if program.reader == "custom_op":
        found.append(f"custom_op({program.reader_on},{program.custom_view})")
    elif program.reader != "none":
        found.append(f"read:{program.reader}({program.reader_on},{program.reader_use})")
    if program.second:
        found.append("second_rope")
    if program.spelling != "plain":
        found.append(f"spell:{program.spelling}")
    if program.form == "sglang" and program.gather != "index_select":
        found.append(f"gather:{program.gather}")
    if program.index_mode != "in_range":
        found.append(f"{index_on}:{program.index_mode}")
    return found

"""Autograd for the two in-place RoPE ops: the backward of a rotation is the inverse rotation.

RoPE rotates each pair ``(x1, x2)`` of the first ``rotary_dim`` features by the angle of its
token's position; the Jacobian is that rotation, so the gradient of the input is the gradient
of the output rotated back, the same rotation with ``sin`` negated::

    g1_in =  g1_out * c + g2_out * s
    g2_in = -g1_out * s + g2_out * c

Features beyond ``rotary_dim`` pass through, and so does their gradient. The backward runs the
op itself (the same kernel) on a table of the used cache rows with the sin half negated,
gathered by position (``[num_tokens, rotary_dim]``, smaller than the gradient it rotates), with
positions ``arange(num_tokens)``. ``cos_sin_cache`` gets no gradient: when grad mode is on and
it requires grad, the op raises rather than return a gradient that silently leaves it out.

Why an ``Autograd`` kernel and not ``torch.library.register_autograd``: the latter refuses
mutating schemas (``Cannot register autograd formula for non-functional operator``), and both
ops mutate q and k. The kernel below is what ``register_autograd`` would generate, with one
``autograd.Function`` per rotated tensor rather than one for the op: a Function that marks an
input dirty may return only one tensor when that input is a view (q and k usually are, of one
qkv projection), since the engine rebases a view's history onto its base through
``CopySlices``, which drives a single-output node. The op runs once, below autograd, on both
tensors (one launch; the CPU reference's inner ops are never what autograd records), then each
Function records the rotation of its tensor without touching data (``mark_dirty``: views of
leaves or intermediates are rebased onto their base, as for any in-place op).

With no input requiring grad (or grad mode off) the kernel only redispatches below autograd and
bumps the version counters of q and k, as any in-place op does; nothing else is done there.
"""

from __future__ import annotations

import torch

_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
_grad_enabled = torch.is_grad_enabled
_increment_version = torch._C._increment_version


def _inverse_table(cos_sin_cache, positions, rotary_dim, wrap=False):
    """(table, positions) that rotate by minus each token's angle: the cache rows of
    ``positions`` with their sin half negated, indexed by ``arange(num_tokens)``; ``wrap``:
    the forward's ``wrap_negative_positions`` (rows as eager ``cos_sin_cache[positions]``)."""
    half = rotary_dim // 2
    flat = positions.reshape(-1)
    rows = cos_sin_cache[flat] if wrap else cos_sin_cache.index_select(0, flat)  # [T, rot]
    table = torch.cat((rows[:, :half], rows[:, half:].neg()), dim=1)
    return table, torch.arange(rows.shape[0], dtype=positions.dtype, device=positions.device)


def _writable_grad(grad, fresh):
    """The incoming gradient if this backward owns it (``fresh``: it comes from the
    ``CopySlices`` of a rebased view, which hands over a contiguous clone), else a copy:
    the engine may pass one gradient tensor to several nodes."""
    return grad if fresh else grad.clone(memory_format=torch.contiguous_format)


def _fused_inverse(grad, cos_sin_cache, positions, rotary_dim, is_neox, wrap, fresh):
    g = _writable_grad(grad, fresh)  # [T, H, D]
    table, arange = _inverse_table(cos_sin_cache, positions, rotary_dim, wrap)
    # The op rotates two tensors; the second is an empty one (no heads). Not an empty slice of
    # g: Inductor's scheduler fails on a mutated zero-size view of a mutated buffer (torch 2.13).
    no_heads = g.new_empty((g.shape[0], 0, g.shape[2]))
    torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default(
        g, no_heads, table, arange, rotary_dim, is_neox)
    return g


def _generic_inverse(grad, cos_sin_cache, positions, head_size, is_neox, wrap, fresh):
    g = _writable_grad(grad, fresh)  # query's (or key's) shape
    table, arange = _inverse_table(cos_sin_cache, positions, cos_sin_cache.shape[1], wrap)
    torch.ops.rope_compile.rotary_embedding.default(
        arange, g, g.new_empty((arange.shape[0], 0)), head_size, table, is_neox)
    return g


class _RotatedInPlace(torch.autograd.Function):
    """Records that the op rotates ``x`` in place; backward: ``inverse(grad, *args)``.
    The forward touches no data (the op runs once for both tensors, after)."""

    @staticmethod
    def forward(ctx, x, cos_sin_cache, positions, inverse, args):
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos_sin_cache, positions)  # in-place changes to them are caught
        ctx.inverse, ctx.args = inverse, args
        ctx.fresh_grad = x._is_view()  # rebased through CopySlices: it clones the gradient
        ctx.set_materialize_grads(False)
        return x

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None, None
        cos_sin_cache, positions = ctx.saved_tensors
        return (ctx.inverse(grad, cos_sin_cache, positions, *ctx.args, fresh=ctx.fresh_grad),
                None, None, None, None)


def _check_differentiable(op, named_xs, named_reads) -> None:
    """Raise before any data or graph is touched for what has no correct gradient here."""
    for read, table in named_reads:
        if table.requires_grad:
            raise RuntimeError(
                f"{op}: {read} requires grad, but the op has no gradient for "
                f"{read} (only for the rotated tensors). Pass {read}.detach(), or "
                f"a table with requires_grad=False, or use a pure-torch RoPE to train it.")
    for name, x in named_xs:
        if x.requires_grad and x.is_leaf:
            raise RuntimeError(
                f"{op}: {name} is a leaf tensor that requires grad, and the op rotates it in "
                f"place; rotate a non-leaf (e.g. {name}.clone()) instead.")


def _with_grad(op, names, q, k, cos_sin_cache, positions, rotate, inverse, args):
    # names: the rotated tensors' and the two read tensors' (cos_sin_cache, positions or, for
    # the tables op, cos, sin) argument names.
    _check_differentiable(op._name, ((names[0], q), (names[1], k)),
                          ((names[2], cos_sin_cache), (names[3], positions)))
    # As an in-place aten op: check, run (the op validates before it writes), bump the
    # versions, then rebase the histories (where a view that may not be modified in place,
    # e.g. one of several outputs of split, is refused).
    with torch._C._AutoDispatchBelowAutograd():
        rotate()
    _increment_version((q, k))
    for x in (q, k):
        if x.requires_grad:
            _RotatedInPlace.apply(x, cos_sin_cache, positions, inverse, args)


def _autograd_kernel(op, names, operands, inverse, inverse_args):
    """The Autograd kernel of ``op``: ``operands(*args)`` gives its (rotated a, rotated b,
    cos_sin_cache, positions) (the tables op: (q, k, cos, sin)), ``names`` their argument
    names, ``inverse_args(*args)`` the extra arguments of ``inverse``."""
    redispatch = op.redispatch

    def kernel(keyset, *args):
        below = keyset & _AFTER_AUTOGRAD
        a, b, cos_sin_cache, positions = operands(*args)
        if _grad_enabled() and (a.requires_grad or b.requires_grad
                                or cos_sin_cache.requires_grad or positions.requires_grad):
            _with_grad(op, names, a, b, cos_sin_cache, positions,
                       lambda: redispatch(below, *args), inverse, inverse_args(*args))
            return
        redispatch(below, *args)
        _increment_version((a, b))

    return kernel


def register(lib: torch.library.Library) -> None:
    """Register the Autograd kernels of both ops on ``lib`` (the library that defines them)."""
    fused = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default
    generic = torch.ops.rope_compile.rotary_embedding.default
    # (q, k, cos_sin_cache, positions) and the inverse's extra arguments, from each schema.
    fused_autograd = _autograd_kernel(
        fused, ("q", "k", "cos_sin_cache", "positions"),
        lambda q, k, cache, pos, rot, neox, wrap=False: (q, k, cache, pos),
        _fused_inverse, lambda q, k, cache, pos, rot, neox, wrap=False: (rot, neox, wrap))
    generic_autograd = _autograd_kernel(
        generic, ("query", "key", "cos_sin_cache", "positions"),
        lambda pos, q, k, head, cache, neox, wrap=False: (q, k, cache, pos),
        _generic_inverse, lambda pos, q, k, head, cache, neox, wrap=False: (head, neox, wrap))
    lib.impl(fused._schema.name.split("::")[1], fused_autograd, "Autograd", with_keyset=True)
    lib.impl(generic._schema.name.split("::")[1], generic_autograd, "Autograd",
             with_keyset=True)


# ---------------------------------------------------------------------------------------------
# The cos/sin-tables op and the mRoPE-cache op: the same Autograd kernel; their inverses rotate
# by the same tables with sin negated (full tables: see _full_tables_adjoint_sin).


def _full_tables_adjoint_sin(sin, rotary_dim, is_neox):
    """The sin of the backward of a full-table rotation (``[..., rotary_dim]``, one value per
    feature). Pair i with columns (a, b) maps ``(x_a, x_b)`` by ``[[c_a, -s_a], [s_b, c_b]]``,
    a rotation only when ``s_a == s_b``; the gradient needs its transpose ``[[c_a, s_b],
    [-s_a, c_b]]``, which is the op's own full-table map with the same cos and
    ``sin'[a] = -sin[b]``, ``sin'[b] = -sin[a]``: sin with each pair's columns swapped,
    negated."""
    if is_neox:
        half = rotary_dim // 2
        swapped = torch.cat((sin[..., half:], sin[..., :half]), dim=-1)
    else:
        swapped = sin.unflatten(-1, (rotary_dim // 2, 2)).flip(-1).flatten(-2)
    return swapped.neg()


def _tables_inverse(grad, cos, sin, rotary_dim, is_neox, mrope_section, fresh):
    g = _writable_grad(grad, fresh)  # [T, H, D]
    no_heads = g.new_empty((g.shape[0], 0, g.shape[2]))  # see _fused_inverse
    full = sin.shape[-1] == rotary_dim  # full tables (else pair tables, rotary_dim/2 wide)
    adjoint_sin = _full_tables_adjoint_sin(sin, rotary_dim, is_neox) if full else sin.neg()
    torch.ops.rope_compile.fused_qk_rope_with_cos_sin_tables_inplace.default(
        g, no_heads, cos, adjoint_sin, rotary_dim, is_neox, mrope_section)
    return g


def _mrope_inverse(grad, cos_sin_cache, positions, rotary_dim, is_neox, mrope_section, wrap,
                   interleaved, fresh):
    g = _writable_grad(grad, fresh)  # [T, H, D]
    # The used rows of every stream, sin negated, read back through arange(S * T) as [S, T].
    table, arange = _inverse_table(cos_sin_cache, positions, rotary_dim, wrap)
    no_heads = g.new_empty((g.shape[0], 0, g.shape[2]))
    torch.ops.rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace.default(
        g, no_heads, table, arange.view(positions.shape), rotary_dim, is_neox, mrope_section,
        False, interleaved)
    return g


def register_tables(lib: torch.library.Library) -> None:
    """Register the Autograd kernels of the tables and mRoPE-cache ops on ``lib``."""
    tables = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_tables_inplace.default
    mrope = torch.ops.rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace.default
    tables_autograd = _autograd_kernel(
        tables, ("q", "k", "cos", "sin"),
        lambda q, k, cos, sin, rot, neox, sections=None: (q, k, cos, sin),
        _tables_inverse, lambda q, k, cos, sin, rot, neox, sections=None: (rot, neox, sections))
    mrope_autograd = _autograd_kernel(
        mrope, ("q", "k", "cos_sin_cache", "positions"),
        lambda q, k, cache, pos, rot, neox, sections, wrap=False, interleaved=False: (
            q, k, cache, pos),
        _mrope_inverse,
        lambda q, k, cache, pos, rot, neox, sections, wrap=False, interleaved=False: (
            rot, neox, sections, wrap, interleaved))
    for op, kernel in ((tables, tables_autograd), (mrope, mrope_autograd)):
        lib.impl(op._schema.name.split("::")[1], kernel, "Autograd", with_keyset=True)


# ---------------------------------------------------------------------------------------------
# The angles op: its tables are pair tables, so its inverse is the op again with sin negated,
# i.e. with sin_scale negated (rounding to the table dtype is odd: round(-x) = -round(x)).


def _angles_inverse(grad, angles, _angles, cos_scale, sin_scale, table_dtype, rotary_dim,
                    is_neox, mrope_section, fresh):
    g = _writable_grad(grad, fresh)  # [T, H, D]
    no_heads = g.new_empty((g.shape[0], 0, g.shape[2]))  # see _fused_inverse
    torch.ops.rope_compile.fused_qk_rope_with_angles_inplace.default(
        g, no_heads, angles, cos_scale, -sin_scale, table_dtype, rotary_dim, is_neox,
        mrope_section)
    return g


def register_angles(lib: torch.library.Library) -> None:
    """Register the Autograd kernel of the angles op on ``lib``. Its one read tensor, angles,
    stands for both of the kernel's (cos_sin_cache, positions)."""
    op = torch.ops.rope_compile.fused_qk_rope_with_angles_inplace.default
    kernel = _autograd_kernel(
        op, ("q", "k", "angles", "angles"),
        lambda q, k, angles, cs, ss, dt, rot, neox, sections=None: (q, k, angles, angles),
        _angles_inverse,
        lambda q, k, angles, cs, ss, dt, rot, neox, sections=None: (cs, ss, dt, rot, neox,
                                                                    sections))
    lib.impl(op._schema.name.split("::")[1], kernel, "Autograd", with_keyset=True)

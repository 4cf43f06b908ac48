"""The XPU lane's launch configurations, planned by the planners the launchers call, with
``device_type="xpu"``, each with a problem to run and the reference's answer.

A configuration is one compiled kernel: its signature (as Triton's JIT types the arguments),
its constexprs and its launch options. Which configurations: for each kernel, every value of
every code switch (a bool, dtype or stream-count constexpr: :data:`SIZE_CONSTEXPRS` are the
sizes) with each q/k dtype and rotation style, both tile regimes (few and many tokens, which
can change the warps), partial rotary, and the whole-projection norms, fp8 caches and scales.
:func:`coverage_keys` is what "covered" means: a planner output is covered when each of its
switch values appears with its q dtype in some configuration of the list, and its launch
options with that dtype in some (not necessarily the same) configuration
(``tests/test_xpu_lane.py`` checks the planners' outputs for random problems against it).

Runs under the project's Python (torch, rope_compile); the lane's worker never imports this.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import triton.language as tl

import rope_compile  # noqa: F401  (registers the ops the reference runs through)
from rope_compile.kernels import rope_cache, rope_kv_store, rope_tables

DEVICE_TYPE = "xpu"

# The kernels the launchers launch (module, attribute); a test checks that no other
# ``*_kernel`` is defined in rope_compile.
KERNELS = {
    "fused_qk_rope_kernel": rope_cache,
    "fused_qk_rope_tables_kernel": rope_tables,
    "fused_qk_norm_rope_kv_kernel": rope_kv_store,
}

# Constexprs that are sizes (tiling, widths, section bounds): not code switches.
SIZE_CONSTEXPRS = frozenset({
    "ROT", "HALF_PAD", "BLOCK_H", "Q_ITERS", "K_ITERS", "D", "DV", "TAIL_PAD", "DV_PAD",
    "SECTION_1_START", "SECTION_2_START",
})

TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SMALL_TOKENS, LARGE_TOKENS = 5, 300  # either side of the planners' few-tokens threshold
HQ, HK, D = 4, 2, 128


def kernel_fn(name: str):
    """The Python function of a kernel (under the interpreter too)."""
    kernel = getattr(KERNELS[name], name)
    return getattr(kernel, "fn", kernel)


def kernel_params(name: str) -> list[str]:
    return list(inspect.signature(kernel_fn(name)).parameters)


def constexpr_params(name: str) -> list[str]:
    sig = inspect.signature(kernel_fn(name))
    return [p for p, v in sig.parameters.items() if "constexpr" in str(v.annotation)]


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _maybe(fn, **optional) -> dict:
    """The keyword arguments of ``optional`` that ``fn`` takes (planners gain arguments)."""
    return {k: v for k, v in optional.items() if _accepts(fn, k)}


def _json_value(v):
    if isinstance(v, tl.dtype):
        return {"dtype": str(v)}
    return v


@dataclass
class Config:
    """One compiled kernel and, where ``run`` is set, a problem to run it on."""

    name: str
    kernel: str
    family: str
    signature: dict  # kernel parameter -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr parameter (incl. ints specialised to 1) -> value
    divisible: list  # parameters Triton marks 16-divisible (pointers, ints % 16 == 0)
    options: dict  # num_warps, threads_per_warp
    q_dtype: str
    run: dict | None = None  # see _run_case
    floats: list = field(default_factory=list)  # float parameters (fp32; fp64 from Inductor)

    def key_items(self) -> set:
        return _key_items(self.kernel, self.q_dtype, self.constexprs, self.options)

    def to_json(self) -> dict:
        return {"name": self.name, "kernel": self.kernel, "family": self.family,
                "signature": self.signature,
                "constexprs": {k: _json_value(v) for k, v in self.constexprs.items()},
                "divisible": self.divisible, "options": self.options,
                "floats": self.floats, "run": self.run is not None}


def _key_items(kernel, q_dtype, constexprs, options) -> set:
    opts = ("options", options.get("num_warps"), options.get("threads_per_warp"))
    return {(kernel, q_dtype, name, str(value)) for name, value in constexprs.items()
            if name in constexpr_params(kernel) and name not in SIZE_CONSTEXPRS} | {
        (kernel, q_dtype, *opts)}


def coverage_keys(configs) -> set:
    """``(kernel, q dtype, switch, value)`` and ``(kernel, q dtype, "options", num_warps,
    threads_per_warp)`` of every configuration: what a planner output must find here to be
    covered."""
    return set().union(*(c.key_items() for c in configs))


def plan_key_items(kernel: str, q_dtype: torch.dtype, constexprs: dict, options: dict) -> set:
    """The same items for one planner output (``constexprs`` and ``options`` as planned)."""
    return _key_items(kernel, TL_TYPES[q_dtype], constexprs, _with_defaults(options))


def _with_defaults(options: dict) -> dict:
    # Intel's backend: 4 warps and sub-groups of 32 unless told otherwise.
    return {"num_warps": options.get("num_warps", 4),
            "threads_per_warp": options.get("threads_per_warp", 32)}


def _signature(kernel: str, args: dict, constexprs: dict):
    """Triton's JIT view of the runtime arguments (triton-xpu 3.3): tensors as pointers, ints
    equal to 1 as constexprs, other ints i32/i64, floats fp32; 16-divisible pointers and ints
    marked so."""
    signature, consts, divisible, floats = {}, dict(constexprs), [], []
    for name in kernel_params(kernel):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, torch.Tensor):
            signature[name] = "*" + TL_TYPES[v.dtype]
            divisible.append(name)
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                signature[name] = "constexpr"
                consts[name] = 1
            else:
                signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    divisible.append(name)
        elif isinstance(v, float):
            signature[name] = "fp32"
            floats.append(name)
        else:
            raise TypeError(f"{kernel}.{name}: unexpected argument {type(v).__name__}")
    return signature, consts, divisible, floats


# ---------------------------------------------------------------------------------------------
# Problems: q and k as views of one qkv projection (as in attention), random data, the
# reference's answer from the op's CPU kernel on a clone.

def _qkv(t, hq, hk, d, dtype, gen):
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen).to(dtype)
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    return qkv, q, k, v


def _run_case(args: dict, outputs: dict, expected: dict, grid) -> dict:
    """What the worker needs to run a configuration: the storages of every tensor argument
    (bytes), each pointer argument as (storage, byte offset), the scalars, the grid; and the
    reference's storages after the op (``expected``, by output name)."""
    storages, index, pointers, scalars = [], {}, {}, {}
    for name, v in args.items():
        if isinstance(v, torch.Tensor):
            base = v.untyped_storage()
            key = base.data_ptr()
            if key not in index:
                index[key] = len(storages)
                storages.append(base)
            pointers[name] = (index[key], v.storage_offset() * v.element_size())
        else:
            scalars[name] = v
    out = {}
    for name, t in outputs.items():
        out[name] = {"storage": index[t.untyped_storage().data_ptr()],
                     "dtype": TL_TYPES[t.dtype], "expected": expected[name]}
    return {"storages": [_storage_bytes(s) for s in storages], "pointers": pointers,
            "scalars": scalars,
            "grid": list(grid), "outputs": out}


def _storage_bytes(storage) -> bytes:
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes()


def _bytes(t: torch.Tensor) -> bytes:
    return _storage_bytes(t.untyped_storage())


# Many tokens (the planners' other tile size, and so other warps), in both styles; a smaller
# tile ({"hq": 2}) gives fp32 its 4 warps.
LARGE = ({"tokens": LARGE_TOKENS, "hq": 32, "neox": True},
         {"tokens": LARGE_TOKENS, "hq": 32, "neox": False})


def _styled(changes):
    """(dtype, is_neox, change) for every dtype and change: the style a change names, else
    neox and GPT-J in turn (the style is a switch of its own: each other switch value need not
    meet both)."""
    for dtype in DTYPES:
        for i, change in enumerate(changes):
            change = dict(change)
            yield dtype, change.pop("neox", i % 2 == 0), change


# The first kernel: sglang's cos_sin_cache. Each change of the base (few tokens, full
# rotary), in every dtype and style.
def _rope_configs(gen):
    changes = [{}, {"neox": False}, *LARGE, {"rot": D // 2}]
    if _accepts(rope_cache.launch_shape, "wrap_positions"):
        changes.append({"wrap": True})
    for dtype, neox, change in _styled(changes):
        v = {"tokens": SMALL_TOKENS, "rot": D, "wrap": False, "hq": HQ, **change}
        hq = v["hq"]
        tokens, rot = v["tokens"], v["rot"]
        qkv, q, k, _ = _qkv(tokens, hq, HK, D, dtype, gen)
        cache = torch.randn(64, rot, generator=gen).to(dtype)
        pos = torch.randint(0, 64, (tokens,), generator=gen)
        qr, kr = q[..., :rot], k[..., :rot]
        shape = rope_cache.launch_shape(
            tokens, hq, HK, rot, neox, DEVICE_TYPE, q.element_size(),
            **_maybe(rope_cache.launch_shape, wrap_positions=v["wrap"]))
        args = rope_cache.runtime_args(
            qr, kr, cache, pos, q_stride=qr.stride(), k_stride=kr.stride(),
            cache_stride=cache.stride(), positions_stride=pos.stride(), num_q_heads=hq,
            num_k_heads=HK, **_maybe(rope_cache.runtime_args, num_positions=64))
        ref = qkv.clone()
        rq, rk = ref[:, :hq * D].view(tokens, hq, D), ref[:, hq * D:(hq + HK) * D].view(
            tokens, HK, D)
        rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(
            rq[..., :rot], rk[..., :rot], cache, pos, rot, neox)
        label = f"{'neox' if neox else 'gptj'}-t{tokens}-h{hq}-rot{rot}" + (
            "-wrap" if v["wrap"] else "")
        yield ("rope", dtype, label, args, shape.constexprs, shape.options,
               (tokens, shape.head_splits), {"qkv": qkv}, {"qkv": ref})


# The tables kernel: pair/full tables, angles (per table dtype), mRoPE cache.
def _tables_configs(gen):
    changes = [{}, {"neox": False}, *LARGE, {"hq": 2}, {"source": "full"}, {"mrope": True},
               {"source": "cache", "mrope": True},  # the mRoPE cache op always has sections
               *({"source": "angles", "table_dtype": td} for td in DTYPES),
               {"source": "angles", "table_dtype": torch.bfloat16, "mrope": True}]
    if _accepts(rope_tables.launch_shape, "wrap_positions"):
        changes.append({"source": "cache", "mrope": True, "wrap": True})
    if _accepts(rope_tables.launch_shape, "mrope_interleaved"):  # Qwen3-VL's streams
        changes.append({"source": "cache", "mrope": True, "interleaved": True})
    for dtype, neox, change in _styled(changes):
        v = {"tokens": SMALL_TOKENS, "source": "pair", "table_dtype": None, "mrope": False,
             "wrap": False, "interleaved": False, "hq": HQ, **change}
        hq = v["hq"]
        tokens, source, table_dtype, mrope = v["tokens"], v["source"], v["table_dtype"], v["mrope"]
        rot = D
        half = rot // 2
        section = (half // 2, half // 4, half - half // 2 - half // 4) if mrope else None
        streams = (3,) if mrope else ()
        qkv, q, k, _ = _qkv(tokens, hq, HK, D, dtype, gen)
        ref = qkv.clone()
        rq, rk = ref[:, :hq * D].view(tokens, hq, D), ref[:, hq * D:(hq + HK) * D].view(
            tokens, HK, D)
        common = {"q_stride": q.stride(), "k_stride": k.stride(), "num_q_heads": hq,
                  "num_k_heads": HK}
        if source in ("pair", "full"):
            width = half if source == "pair" else rot
            cos = torch.randn(*streams, tokens, width, generator=gen).to(dtype)
            sin = torch.randn(*streams, tokens, width, generator=gen).to(dtype)
            args = rope_tables.tables_runtime_args(q, k, cos, sin, cos_size=cos.shape,
                                                   cos_stride=cos.stride(),
                                                   sin_stride=sin.stride(), **common)
            shape = rope_tables.launch_shape(tokens, hq, HK, rot, neox, DEVICE_TYPE,
                                             q.element_size(), from_cache=False,
                                             mrope_section=section,
                                             full_tables=source == "full")
            rope_compile.fused_qk_rope_with_cos_sin_tables_inplace(
                rq, rk, cos, sin, rot, neox, list(section) if mrope else None)
        elif source == "angles":
            angles = torch.rand(*streams, tokens, half, generator=gen) * 100.0
            args = rope_tables.angles_runtime_args(q, k, angles, angles_size=angles.shape,
                                                   angles_stride=angles.stride(),
                                                   cos_scale=0.75, sin_scale=1.25, **common)
            shape = rope_tables.launch_shape(tokens, hq, HK, rot, neox, DEVICE_TYPE,
                                             q.element_size(), from_cache=False,
                                             mrope_section=section,
                                             angles_table_dtype=table_dtype)
            rope_compile.fused_qk_rope_with_angles_inplace(
                rq, rk, angles, 0.75, 1.25, table_dtype, rot, neox,
                list(section) if mrope else None)
        else:
            cache = torch.randn(64, rot, generator=gen).to(dtype)
            pos = torch.randint(0, 64, (3, tokens), generator=gen)
            args = rope_tables.cache_runtime_args(
                q, k, cache, pos, cache_stride=cache.stride(), positions_size=pos.shape,
                positions_stride=pos.stride(), **common,
                **_maybe(rope_tables.cache_runtime_args, cache_size=cache.shape))
            shape = rope_tables.launch_shape(
                tokens, hq, HK, rot, neox, DEVICE_TYPE, q.element_size(), from_cache=True,
                mrope_section=section,
                **_maybe(rope_tables.launch_shape, wrap_positions=v["wrap"]),
                **({"mrope_interleaved": True} if v["interleaved"] else {}))
            rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace(
                rq, rk, cache, pos, rot, neox, list(section),
                **({"mrope_interleaved": True} if v["interleaved"] else {}))
        label = source + (f"-{TL_TYPES[table_dtype]}" if table_dtype else "")
        label += "-wrap" if v["wrap"] else ""
        label += "-interleaved" if v["interleaved"] else ""
        yield (f"tables-{source}", dtype,
               f"{label}-{'mrope' if mrope else 'one'}-{'neox' if neox else 'gptj'}-t{tokens}"
               f"-h{hq}",
               args, shape.constexprs, shape.options, (tokens, shape.head_splits),
               {"qkv": qkv}, {"qkv": ref})


# The QK-norm + RoPE + KV-store kernel. Norm forms: (weight_offset, round_once, whole q,
# whole k); stores: (k cache dtype, v cache dtype, k_scale, v_scale).
NORMS = {"none": None, "qwen3": (0.0, None, False, False), "gemma": (1.0, None, False, False),
         "olmo2": (0.0, True, False, False), "whole": (0.0, True, True, True),
         "whole-q": (0.0, True, True, False)}
STORES = {"none": None, "same": ("same", "same", None, None),
          "scaled": ("same", "same", 0.5, 2.0),
          "fp8": ("fp8", "fp8", 0.25, 0.5), "fp8-k": ("fp8", "same", None, None)}


def _kv_variants():
    """(dtype, neox, tokens, rot, source, norm, store): each switch varied over dtype x style
    around a base (cache source, Qwen3 norm, plain store, full rotary, few tokens)."""
    base = {"tokens": SMALL_TOKENS, "rot": D, "source": "cache", "norm": "qwen3",
            "store": "same", "hq": HQ}
    changes = [{}, {"neox": False}, *LARGE, {"hq": 2}, {"rot": D // 2}, {"source": "tables"},
               *({"norm": n} for n in NORMS if n != "qwen3"),
               *({"store": s} for s in STORES if s != "same"),
               {"norm": "none", "store": "fp8"}, *({"norm": "whole", **c} for c in LARGE),
               {"norm": "gemma", "rot": D // 2, "store": "fp8"}]
    for flag, default in (("wrap_positions", False), ("wrap_loc", True)):
        if _accepts(rope_kv_store.plan_launch, flag):
            changes.append({flag: not default})
    for dtype, neox, change in _styled(changes):
        yield dtype, neox, {**base, **change}


def _kv_configs(gen):
    fp8 = getattr(torch, "float8_e4m3fn", None)
    for dtype, neox, v in _kv_variants():
        tokens, rot, norm, store = v["tokens"], v["rot"], NORMS[v["norm"]], STORES[v["store"]]
        hq = v["hq"]
        if norm is None and store is None:
            continue
        qkv, q, k, vv = _qkv(tokens, hq, HK, D, dtype, gen)
        ref = qkv.clone()
        rq, rk = ref[:, :hq * D].view(tokens, hq, D), ref[:, hq * D:(hq + HK) * D].view(
            tokens, HK, D)
        rv = ref[:, (hq + HK) * D:].view(tokens, HK, D)
        outputs, expected = {"qkv": qkv}, {"qkv": ref}
        if v["source"] == "cache":
            cache = torch.randn(64, rot, generator=gen).to(dtype)
            pos = torch.randint(0, 64, (tokens,), generator=gen)
            rope = rope_kv_store.FromCache(*map(rope_kv_store.tensor_operand, (cache, pos)))
            rope_args = (cache, pos)
        else:
            cos = torch.randn(tokens, rot // 2, generator=gen).to(dtype)
            sin = torch.randn(tokens, rot // 2, generator=gen).to(dtype)
            rope = rope_kv_store.FromTables(*map(rope_kv_store.tensor_operand, (cos, sin)))
            rope_args = (cos, sin)
        norm_args = norm_op = None
        if norm is not None:
            offset, round_once, whole_q, whole_k = norm
            qw = torch.randn(hq * D if whole_q else D, generator=gen).to(dtype)
            kw = torch.randn(HK * D if whole_k else D, generator=gen).to(dtype)
            norm_op = (qw, kw, 1e-6, offset)
            norm_args = (rope_kv_store.tensor_operand(qw), rope_kv_store.tensor_operand(kw),
                         1e-6, offset, round_once)
        kv_args = kv_op = None
        fp8_flags = (False, False)
        if store is not None:
            kd, vd, ks, vs = store
            kd = fp8 if kd == "fp8" else dtype
            vd = fp8 if vd == "fp8" else dtype
            slots = 16
            kb = torch.zeros(slots, HK, D, dtype=kd)
            vb = torch.zeros(slots, HK, D, dtype=vd)
            loc = torch.randperm(slots, generator=gen)[:tokens] if tokens <= slots else None
            if loc is None:
                slots = tokens + 3
                kb = torch.zeros(slots, HK, D, dtype=kd)
                vb = torch.zeros(slots, HK, D, dtype=vd)
                loc = torch.randperm(slots, generator=gen)[:tokens]
            kb_ref, vb_ref = kb.clone(), vb.clone()
            kb_bits = kb.view(torch.uint8) if kd == fp8 else kb
            vb_bits = vb.view(torch.uint8) if vd == fp8 else vb
            fp8_flags = (kd == fp8, vd == fp8)
            kv_args = (rope_kv_store.tensor_operand(vv), rope_kv_store.tensor_operand(kb_bits),
                       rope_kv_store.tensor_operand(vb_bits), rope_kv_store.tensor_operand(loc),
                       ks, vs)
            kv_op = (kb_ref, vb_ref, loc, ks, vs)
            outputs.update(k_buffer=kb_bits, v_buffer=vb_bits)
            expected.update(k_buffer=kb_ref.view(torch.uint8) if kd == fp8 else kb_ref,
                            v_buffer=vb_ref.view(torch.uint8) if vd == fp8 else vb_ref)
        flags = {f: v[f] for f in ("wrap_positions", "wrap_loc") if f in v}
        plan = rope_kv_store.plan_launch(
            rope_kv_store.tensor_operand(q), rope_kv_store.tensor_operand(k), rope, rot, neox,
            norm=norm_args, kv=kv_args, fp8=fp8_flags, device_type=DEVICE_TYPE,
            elem_bytes=q.element_size(), **flags)
        _kv_reference(rq, rk, rv, rope_args, v["source"], rot, neox, norm_op,
                      norm[1] if norm else None, kv_op)
        label = "-".join(f"{n}={v[n]}" for n in ("source", "norm", "store", "rot", "tokens",
                                                "hq", "wrap_positions", "wrap_loc") if n in v)
        yield (f"kv-{v['norm']}-{v['store']}", dtype,
               f"{label}-{'neox' if neox else 'gptj'}", plan.args, plan.constexprs,
               plan.options, plan.grid, outputs, expected)


def _kv_reference(q, k, v, rope_args, source, rot, neox, norm, round_once, kv):
    """The op's CPU kernel (the reference) on the clones."""
    tables = source == "tables"
    if norm is not None and kv is not None:
        fn = (rope_compile.fused_qk_norm_rope_kv_store_tables_inplace if tables
              else rope_compile.fused_qk_norm_rope_kv_store_inplace)
        kb, vb, loc, ks, vs = kv
        fn(q, k, v, kb, vb, loc, *norm, *rope_args, rot, neox, ks, vs, round_once=round_once)
    elif norm is not None:
        fn = (rope_compile.fused_qk_norm_rope_tables_inplace if tables
              else rope_compile.fused_qk_norm_rope_inplace)
        fn(q, k, *norm, *rope_args, rot, neox, round_once=round_once)
    else:
        fn = (rope_compile.fused_qk_rope_kv_store_tables_inplace if tables
              else rope_compile.fused_qk_rope_kv_store_inplace)
        kb, vb, loc, ks, vs = kv
        fn(q, k, v, kb, vb, loc, *rope_args, rot, neox, ks, vs)


def configs(seed: int = 0) -> list[Config]:
    """Every configuration of the lane, with its run case."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for kernel, source in (("fused_qk_rope_kernel", _rope_configs),
                           ("fused_qk_rope_tables_kernel", _tables_configs),
                           ("fused_qk_norm_rope_kv_kernel", _kv_configs)):
        for family, dtype, label, args, constexprs, options, grid, outputs, expected in (
                source(gen)):
            signature, consts, divisible, floats = _signature(kernel, args, constexprs)
            run = _run_case(args, outputs, {n: _bytes(t) for n, t in expected.items()}, grid)
            out.append(Config(f"{family}/{TL_TYPES[dtype]}/{label}", kernel, family, signature,
                              consts, divisible, _with_defaults(options), TL_TYPES[dtype], run,
                              floats))
    return out

"""The XPU lane's list of configurations (``tools/xpu_lane/configs.py``) covers what the planners
emit for ``device_type="xpu"``: every kernel, every code switch, and, for random problems, every
(switch value, q dtype, launch options) the planners choose. The lane itself (compiling and
running them) is ``.ci/xpu_lane.sh``; see docs/xpu.md."""

from __future__ import annotations

import ast
import functools
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rope_compile.kernels import rope_cache, rope_kv_store, rope_tables  # noqa: E402
from tools.xpu_lane import configs as lane  # noqa: E402


@functools.lru_cache(maxsize=1)
def _lane_configs():
    return lane.configs()


@functools.lru_cache(maxsize=1)
def _lane_keys():
    return lane.coverage_keys(_lane_configs())


def test_every_kernel_is_in_the_lane():
    """Each ``@triton.jit`` kernel rope_compile launches (a ``*_kernel``) is one of the lane's."""
    found = set()
    for path in (ROOT / "rope_compile").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel")
                    and any(ast.unparse(d) == "triton.jit" for d in node.decorator_list)):
                found.add(node.name)
    assert found == set(lane.KERNELS)


@pytest.mark.parametrize("kernel", sorted(lane.KERNELS))
def test_every_switch_takes_each_value_in_the_lane(kernel):
    """A constexpr that is not a size is a code switch: the lane has both values of a bool
    switch, and some value of every other, for the kernel; a new constexpr fails here until
    the lane plans it (or it is listed as a size)."""
    seen = {}
    for c in _lane_configs():
        if c.kernel == kernel:
            for name, value in c.constexprs.items():
                seen.setdefault(name, set()).add(str(value))
    for name in lane.constexpr_params(kernel):
        if name in lane.SIZE_CONSTEXPRS:
            continue
        assert name in seen, f"{kernel}.{name}: no lane configuration sets it"
        values = seen[name]
        if values <= {"True", "False"}:
            assert values == {"True", "False"}, f"{kernel}.{name}: only {values} in the lane"


def _random_problems(rng, n):
    for _ in range(n):
        head = rng.choice([64, 80, 96, 128, 256])
        yield {"tokens": rng.choice([1, 3, 17, 200, 256, 257, 1000, 4096]),
               "hq": rng.choice([1, 2, 4, 8, 16, 32, 40, 64]),
               "hk": rng.choice([1, 2, 4, 8]), "head": head,
               "rot": rng.choice([head, head // 2]), "neox": rng.random() < 0.5,
               "dtype": rng.choice(lane.DTYPES)}


def _missing(items) -> set:
    return items - _lane_keys()


def test_rope_planner_outputs_are_covered():
    rng = random.Random(0)
    for p in _random_problems(rng, 200):
        for wrap in (False, True):
            shape = rope_cache.launch_shape(
                p["tokens"], p["hq"], p["hk"], p["rot"], p["neox"], "xpu",
                p["dtype"].itemsize, **lane._maybe(rope_cache.launch_shape,
                                                   wrap_positions=wrap))
            missing = _missing(lane.plan_key_items("fused_qk_rope_kernel", p["dtype"],
                                                   shape.constexprs, shape.options))
            assert not missing, (p, missing)


def test_tables_planner_outputs_are_covered():
    rng = random.Random(1)
    for p in _random_problems(rng, 200):
        half = p["rot"] // 2
        section = (half // 2, half // 4, half - half // 2 - half // 4)
        kind = rng.choice(["pair", "full", "angles", "cache"])
        kwargs = {"from_cache": kind == "cache", "full_tables": kind == "full",
                  "mrope_section": section if kind == "cache" or rng.random() < 0.5 else None}
        if kind == "angles":
            kwargs["angles_table_dtype"] = rng.choice(lane.DTYPES)
        if kind == "cache":
            kwargs.update(lane._maybe(rope_tables.launch_shape,
                                      wrap_positions=rng.random() < 0.5))
        shape = rope_tables.launch_shape(p["tokens"], p["hq"], p["hk"], p["rot"], p["neox"],
                                         "xpu", p["dtype"].itemsize, **kwargs)
        missing = _missing(lane.plan_key_items("fused_qk_rope_tables_kernel", p["dtype"],
                                               shape.constexprs, shape.options))
        assert not missing, (p, kwargs, missing)


def test_kv_planner_outputs_are_covered():
    """Random problems through ``rope_kv_store.plan_launch`` (sizes and strides only)."""
    rng = random.Random(2)
    op = rope_kv_store.Operand
    for p in _random_problems(rng, 300):
        t, hq, hk, d, rot = p["tokens"], p["hq"], p["hk"], p["head"], p["rot"]
        q, k = op(None, (t, hq, d), (hq * d, d, 1)), op(None, (t, hk, d), (hk * d, d, 1))
        if rng.random() < 0.5:
            rope = rope_kv_store.FromCache(op(None, (64, rot), (rot, 1)), op(None, (t,), (1,)))
        else:
            rope = rope_kv_store.FromTables(op(None, (t, rot // 2), (rot // 2, 1)),
                                            op(None, (t, rot // 2), (rot // 2, 1)))
        norm = kv = None
        form = rng.choice(list(lane.NORMS))
        if lane.NORMS[form] is not None:
            offset, round_once, whole_q, whole_k = lane.NORMS[form]
            norm = (op(None, (hq * d if whole_q else d,), (1,)),
                    op(None, (hk * d if whole_k else d,), (1,)), 1e-6, offset, round_once)
        store = rng.choice(list(lane.STORES))
        fp8 = (False, False)
        if lane.STORES[store] is not None or norm is None:
            kd, vd, ks, vs = lane.STORES[store] or lane.STORES["same"]
            buf = op(None, (t + 4, hk, d), (hk * d, d, 1))
            kv = (op(None, (t, hk, d), (hk * d, d, 1)), buf, buf, op(None, (t,), (1,)), ks, vs)
            fp8 = (kd == "fp8", vd == "fp8")
        flags = {f: rng.random() < 0.5 for f in ("wrap_positions", "wrap_loc")
                 if lane._accepts(rope_kv_store.plan_launch, f)}
        plan = rope_kv_store.plan_launch(q, k, rope, rot, p["neox"], norm=norm, kv=kv, fp8=fp8,
                                         device_type="xpu", elem_bytes=p["dtype"].itemsize,
                                         **flags)
        missing = _missing(lane.plan_key_items("fused_qk_norm_rope_kv_kernel", p["dtype"],
                                               plan.constexprs, plan.options))
        assert not missing, (p, form, store, flags, missing)


def test_xpu_launch_options_are_sub_groups_of_16():
    """device_launch_options on xpu: the sub-group size the lane found spill-free on PVC; CUDA's
    options are unchanged (no threads_per_warp)."""
    for tile in (64, 512, 2048, 4096):
        for elem in (2, 4):
            xpu = rope_cache.device_launch_options("xpu", tile, elem, vectors_per_lane=2)
            assert xpu["threads_per_warp"] == 16 and 4 <= xpu["num_warps"] <= 8
            assert set(rope_cache.device_launch_options("cuda", tile, elem)) == {"num_warps"}


def test_lane_list_has_runs_and_dtypes():
    cs = _lane_configs()
    assert all(c.run is not None for c in cs)
    assert len({c.name for c in cs}) == len(cs)
    assert {c.q_dtype for c in cs} == {"bf16", "fp16", "fp32"}
    assert torch.float32 in lane.DTYPES

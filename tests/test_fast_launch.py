"""The eager fast path of the public functions (``rope_compile.fast_launch``).

On CPU: when the path is taken, what goes into the layout key (so a cached launch is only
reused where the checks and Triton's specialisation would give the same answer), and that the
relaunch passes the kernel's arguments in its parameter order, with a recording stand-in for
Triton's compiled kernel. On a GPU (marked ``gpu``): the real relaunch, checked element by
element against the float64 oracle.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import (
    GPU_DEVICE,
    OP_APPLIES,
    RopeCase,
    build_problem,
    case_params,
    make_qkv,
    run_and_check,
    with_,
)

pytest.importorskip("triton")

import rope_compile  # noqa: E402
from rope_compile import fast_launch, set_check_positions  # noqa: E402
from rope_compile.kernels import rope_cache as tk  # noqa: E402


def test_triton_launches_as_fast_launch_relaunches():
    """The relaunch mirrors one line of Triton's JITFunction.run; if Triton changes it, the
    fast path turns itself off, and this test says so."""
    from triton.runtime.jit import JITFunction

    source = "".join(inspect.getsource(JITFunction.run).split())
    assert fast_launch._TRITON_LAUNCH in source


def test_enabled_exactly_when_kernels_are_compiled():
    assert fast_launch.fast_launch_enabled() == (not tk.is_interpreter())


def test_one_launch_description_matches_the_kernel_signature():
    """RUNTIME_ARGS then the constexprs of launch_shape are exactly the kernel's parameters,
    in order: the eager launch, the fast path and the Inductor lowering all build from them."""
    names = tk.fused_qk_rope_kernel.arg_names
    shape = tk.launch_shape(7, 4, 2, 64, True, "cuda", 2)
    assert names == [*tk.RUNTIME_ARGS, *shape.constexprs]


def test_launch_tail_follows_the_kernel_parameters():
    """The relaunch passes (q, k, cache, positions, *ints, *constexprs) positionally: the plan's
    order must be the kernel's."""
    p = build_problem(RopeCase(num_tokens=5, layout="padded"))
    plan = tk.plan_launch(p.q, p.k, p.cos_sin_cache, p.positions, p.rotary_dim, p.is_neox)
    names = tk.fused_qk_rope_kernel.arg_names
    assert names[:4] == ["q_ptr", "k_ptr", "cache_ptr", "pos_ptr"]
    assert len(names) == 4 + len(plan.ints) + len(plan.constexprs)
    assert names[4 + len(plan.ints):] == list(plan.constexprs)
    strides = dict(zip(names[4:4 + len(plan.ints)], plan.ints, strict=True))
    assert strides["q_token_stride"] == p.q.stride(0) != p.k.stride(0) == strides["k_token_stride"]
    assert strides["num_q_heads"] == p.q.shape[1] and strides["num_k_heads"] == p.k.shape[1]


# --------------------------------------------------------------------------------------------
# CPU: the fast path's logic with CPU tensors standing in for GPU ones

class _RecordingKernel:
    """Stands in for Triton's CompiledKernel: records each launch and applies the reference,
    so the results can be checked too."""

    function = "function"
    packed_metadata = "packed"

    def __init__(self):
        self.launches = []

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream)

    def run(self, gx, gy, gz, stream, function, packed, metadata, enter, leave, *args):
        self.launches.append(((gx, gy, gz), stream, function, packed, metadata, args))
        self.hooks = (enter, leave)


class _Driver:
    def __init__(self):
        self.device = 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return 1234


@pytest.fixture
def cpu_fast_path(monkeypatch):
    """The fast path switched on for CPU tensors, with a recording kernel and no real launch."""
    from types import SimpleNamespace

    kernel = _RecordingKernel()
    driver = _Driver()
    first_calls = []

    def launch_first(q, k, cache, positions, rotary_dim, is_neox):
        first_calls.append((q.shape, k.shape))
        if q.shape[0] == 0:
            return fast_launch._Launch(None, None, None, None, (0, 0), -1, (), False)
        plan = tk.plan_launch(q, k, cache, positions, rotary_dim, is_neox)
        return fast_launch._Launch(kernel, kernel.run, kernel.function, kernel.packed_metadata,
                                   plan.grid, 0, (*plan.ints, *plan.constexprs.values()), False)

    monkeypatch.setattr(fast_launch, "_enabled", True)
    monkeypatch.setattr(fast_launch, "_FAST_DEVICES", ("cpu",))
    monkeypatch.setattr(fast_launch, "_driver", driver, raising=False)
    monkeypatch.setattr(fast_launch, "_current_device", driver.get_current_device, raising=False)
    knobs = SimpleNamespace(runtime=SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))
    monkeypatch.setattr(fast_launch, "_knobs", knobs, raising=False)
    monkeypatch.setattr(fast_launch, "_launch_first", launch_first)
    monkeypatch.setattr(fast_launch, "_launches", {})
    return kernel, first_calls, driver


def _problem(seed=0, **changes):
    return build_problem(with_(RopeCase(num_tokens=5), **changes), seed=seed)


def _fused(p) -> bool:
    return fast_launch.try_fused(p.q_rot(), p.k_rot(), p.cos_sin_cache, p.positions,
                                 p.rotary_dim, p.is_neox)


def test_second_call_of_a_layout_relaunches(cpu_fast_path):
    kernel, first_calls, _ = cpu_fast_path
    first, second = _problem(seed=0), _problem(seed=1)
    assert _fused(first) and len(first_calls) == 1 and not kernel.launches
    version = second.q._version
    assert _fused(second)
    assert len(first_calls) == 1, "same layout: no second first call"
    [(grid, stream, function, packed, metadata, args)] = kernel.launches
    plan = tk.plan_launch(second.q_rot(), second.k_rot(), second.cos_sin_cache, second.positions,
                          second.rotary_dim, second.is_neox)
    assert grid == (*plan.grid, 1) and stream == 1234
    assert (function, packed, metadata, kernel.hooks) == ("function", "packed", None, (None, None))
    # The tensors of this call (not the first one's), then the plan's ints and constexprs.
    assert args[0].data_ptr() == second.q.data_ptr() and args[1].data_ptr() == second.k.data_ptr()
    assert args[2] is second.cos_sin_cache and args[3] is second.positions
    assert args[4:] == (*plan.ints, *plan.constexprs.values())
    assert second.q._version > version, "in-place: the version counter moves, as via the op"


def test_inference_mode_tensors(cpu_fast_path):
    """Servers run under inference_mode: its tensors have no version counter to bump."""
    kernel, _, _ = cpu_fast_path
    with torch.inference_mode():
        for seed in (0, 1):
            assert _fused(_problem(seed=seed))
    assert len(kernel.launches) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"dtype": torch.float16},
        {"num_tokens": 6},
        {"rotary_dim": 64},
        {"is_neox": False},
        {"pos_dtype": torch.int32},
        {"layout": "contiguous"},
        {"same_dtype_cache": True},
        {"strided_positions": True},
        {"cache_kind": "transposed"},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_any_layout_change_is_a_new_first_call(cpu_fast_path, change):
    _, first_calls, _ = cpu_fast_path
    assert _fused(_problem()) and _fused(_problem(**change))
    assert len(first_calls) == 2


def test_pointer_alignment_is_part_of_the_key(cpu_fast_path):
    """Triton specialises on 16-byte pointer alignment: a q one element off is a new entry."""
    _, first_calls, _ = cpu_fast_path
    p = _problem(num_tokens=3)
    cache, pos = p.cos_sin_cache, p.positions
    buf = torch.randn(3 * 6 * 128 + 1, dtype=torch.bfloat16)
    for offset in (0, 1):
        view = buf[offset:offset + 3 * 6 * 128].view(3, 6, 128)
        q, k = view[:, :4], view[:, 4:]
        assert fast_launch.try_fused(q, k, cache, pos, 128, True)
    assert len(first_calls) == 2


def test_overlap_is_checked_for_a_new_offset_between_q_and_k(cpu_fast_path):
    """A layout first seen with q and k in separate storages is not trusted for views of one
    storage: there the check runs again and rejects the overlap."""
    _, first_calls, _ = cpu_fast_path
    cache = torch.rand(64, 128) * 2 - 1
    pos = torch.randint(0, 64, (4,))
    q, k = torch.randn(4, 2, 128), torch.randn(4, 2, 128)
    assert fast_launch.try_fused(q, k, cache, pos, 128, True)
    shared = torch.randn(4 * 2 * 128 + 128)
    q2 = shared[:1024].view(4, 2, 128)
    k2 = shared[128:1152].view(4, 2, 128)  # overlaps q2 but for one head row
    with pytest.raises(ValueError, match="overlap"):
        fast_launch.try_fused(q2, k2, cache, pos, 128, True)
    assert len(first_calls) == 1


def test_bad_input_still_gets_the_ops_errors(cpu_fast_path):
    p = _problem()
    with pytest.raises(ValueError, match="rotary_dim"):
        fast_launch.try_fused(p.q, p.k, p.cos_sin_cache, p.positions, 62, True)
    with pytest.raises(ValueError, match="positions must be int32 or int64"):
        fast_launch.try_fused(p.q_rot(), p.k_rot(), p.cos_sin_cache, p.positions.float(),
                              p.rotary_dim, True)


def test_zero_tokens_launch_nothing(cpu_fast_path):
    kernel, first_calls, _ = cpu_fast_path
    for seed in (0, 1):
        assert _fused(_problem(seed=seed, num_tokens=0))
    assert len(first_calls) == 1 and not kernel.launches


def test_launch_hooks_are_passed_when_set(cpu_fast_path, monkeypatch):
    """A profiler's launch hook (Triton's knobs) sees our relaunches as it sees JIT launches;
    an empty hook chain counts as none."""

    class HookChain:  # the shape of triton.knobs.HookChain (Triton >= 3.5)
        def __init__(self):
            self.calls = []

        def add(self, fn):
            self.calls.append(fn)

    kernel, _, _ = cpu_fast_path
    runtime = fast_launch._knobs.runtime
    runtime.launch_enter_hook, runtime.launch_exit_hook = HookChain(), HookChain()
    for seed in (0, 1):
        assert _fused(_problem(seed=seed))
    assert kernel.launches[-1][4] is None and kernel.hooks == (None, None)

    def enter(metadata):
        pass

    runtime.launch_enter_hook.add(enter)
    assert _fused(_problem(seed=2))
    grid, stream, _, _, metadata, _ = kernel.launches[-1]
    assert metadata == ("metadata", grid[:2], stream)
    assert kernel.hooks == (runtime.launch_enter_hook, runtime.launch_exit_hook)


def test_other_current_device_goes_through_the_op(cpu_fast_path):
    kernel, _, driver = cpu_fast_path
    assert _fused(_problem(seed=0))
    driver.device = 1
    assert not _fused(_problem(seed=1)) and not kernel.launches


def test_generic_relaunch_passes_the_callers_tensors(cpu_fast_path):
    kernel, first_calls, _ = cpu_fast_path
    for seed in (0, 1):
        p = _problem(seed=seed)
        query, key = p.flat(p.q), p.flat(p.k)
        assert fast_launch.try_generic(p.positions, query, key, p.head_size, p.cos_sin_cache,
                                       p.is_neox)
    assert len(first_calls) == 1
    [(_, _, _, _, _, args)] = kernel.launches
    assert args[0] is query and args[1] is key  # same data pointers as the [T, H, D] views


def test_generic_positions_copy_is_not_stored(cpu_fast_path):
    """2-D positions that reshape(-1) must copy: launching on the originals would be wrong."""
    _, first_calls, _ = cpu_fast_path
    for _ in range(2):
        p = _problem(num_tokens=6)
        positions = p.positions.view(3, 2).t()  # not viewable as [6]
        fast_launch.try_generic(positions, p.q, p.k, p.head_size, p.cos_sin_cache, p.is_neox)
    assert len(first_calls) == 2


def _eligible(p, rotary_dim=None, is_neox=None) -> bool:
    return fast_launch._eligible(
        p.q, p.k, p.cos_sin_cache, p.positions,
        p.rotary_dim if rotary_dim is None else rotary_dim,
        p.is_neox if is_neox is None else is_neox,
    )


def test_eligible_for_plain_tensors(cpu_fast_path):
    assert _eligible(_problem())


def test_not_eligible_when_the_dispatcher_matters(cpu_fast_path, restore_check_positions):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    p = _problem()
    assert not _eligible(p, rotary_dim=128.0)
    assert not _eligible(p, is_neox=1)
    grad = _problem()
    grad.q.requires_grad_(True)
    assert not _eligible(grad)
    param = _problem()
    param.cos_sin_cache = torch.nn.Parameter(param.cos_sin_cache, requires_grad=False)
    assert not _eligible(param), "a tensor subclass"
    with TorchDispatchMode():
        assert not _eligible(p)
    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with PassThrough():
        assert not _eligible(p)
    with FakeTensorMode():
        assert not _eligible(p)
    set_check_positions(True)
    assert not _eligible(p)
    set_check_positions(False)
    assert _eligible(p)
    assert torch.func.vmap(lambda x: torch.tensor(_eligible(p)))(torch.zeros(2)).tolist() == [
        False, False]


def test_compiled_callers_trace_the_op(cpu_fast_path):
    """Under torch.compile the public function records the op in the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    p = _problem()

    @torch.compile(backend=counter, fullgraph=True)
    def rotate(q, k, cache, positions):
        rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(q, k, cache, positions, 128, True)

    rotate(p.q, p.k, p.cos_sin_cache, p.positions)
    [graph] = counter.graphs
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default]


# --------------------------------------------------------------------------------------------
# GPU: the real relaunch

def _forbid_first_calls(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("expected a relaunch of a stored layout, not a first call")

    monkeypatch.setattr(fast_launch, "_launch_first", fail)


GPU_CASES = [
    RopeCase(num_tokens=1, num_q_heads=32, num_kv_heads=8),
    RopeCase(num_tokens=7, rotary_dim=64, is_neox=False, dtype=torch.float16,
             pos_dtype=torch.int32),
    RopeCase(num_tokens=33, layout="padded", head_size=256, rotary_dim=128, nan_tail=True),
    RopeCase(num_tokens=5, layout="contiguous", dtype=torch.float32, cache_kind="transposed",
             strided_positions=True),
    RopeCase(num_tokens=0),
    RopeCase(num_tokens=4097, num_q_heads=32, num_kv_heads=8, rotary_dim=96, is_neox=False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("apply", ["fused-public", "generic-public"])
@pytest.mark.parametrize("case", case_params(GPU_CASES))
def test_gpu_relaunch_matches_the_oracle(gpu_device, case, apply, monkeypatch):
    """Warm the layout with a problem of other data; this one must then be a relaunch."""
    assert fast_launch.fast_launch_enabled()

    def run(p):
        OP_APPLIES[apply](build_problem(p.case, p.q.device, seed=1))
        _forbid_first_calls(monkeypatch)
        return OP_APPLIES[apply](p)

    run_and_check(case, run, gpu_device)


@pytest.mark.gpu
def test_gpu_relaunch_is_bitwise_the_op(gpu_device):
    case = RopeCase(num_tokens=300, num_q_heads=32, num_kv_heads=8, rotary_dim=64)
    via_op, via_fast = build_problem(case, gpu_device), build_problem(case, gpu_device)
    for p in (build_problem(case, gpu_device, seed=2), via_fast):  # the second is a relaunch
        OP_APPLIES["fused-public"](p)
    OP_APPLIES["fused-op"](via_op)
    torch.testing.assert_close(via_fast.q, via_op.q, rtol=0, atol=0)
    torch.testing.assert_close(via_fast.k, via_op.k, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_misaligned_after_aligned(gpu_device):
    """A q/k one element off 16 bytes, after the aligned layout was stored: its own entry, and
    still right."""
    from conftest import rope_f64

    cache = torch.rand(64, 128, device=gpu_device) * 2 - 1
    pos = torch.randint(0, 64, (9,), device=gpu_device)
    buf = torch.randn(9 * 12 * 128 + 1, dtype=torch.bfloat16, device=gpu_device)
    for offset in (0, 1, 0, 1):
        view = buf[offset:offset + 9 * 12 * 128].view(9, 12, 128)
        q, k = view[:, :8], view[:, 8:]
        expected = [rope_f64(x, pos, cache, 128, True) for x in (q, k)]
        rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(q, k, cache, pos, 128, True)
        for x, exp in zip((q, k), expected, strict=True):
            torch.testing.assert_close(x.double().cpu(), exp, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_relaunch_in_a_cuda_graph(gpu_device):
    if gpu_device != "cuda":
        pytest.skip("CUDA graphs")
    q, k, v, qkv = make_qkv(16, 32, 8, 128, torch.bfloat16, gpu_device)
    cache = rope_compile.compute_cos_sin_cache(128, 4096, 10000.0, torch.float32).to(gpu_device)
    pos = torch.randint(0, 4096, (16,), device=gpu_device)
    rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(q, k, cache, pos, 128, True)  # warm
    start = qkv.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(q, k, cache, pos, 128, True)
    qkv.copy_(start)
    graph.replay()
    graph_result = qkv.clone()
    qkv.copy_(start)
    torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(q, k, cache, pos, 128, True)
    torch.testing.assert_close(graph_result, qkv, rtol=0, atol=0)
    assert not torch.equal(graph_result, start)


@pytest.mark.skipif(GPU_DEVICE is not None, reason="the CPU stand-in tests cover this")
def test_cpu_public_functions_use_the_op():
    """Without a GPU (the interpreter), the fast path is never taken."""
    p = _problem()
    assert not _fused(p)

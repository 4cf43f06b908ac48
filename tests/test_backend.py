"""The ``rope_compile`` torch.compile backend: registration, options, modes, chaining, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from pass_helpers import (
    AttnStack,
    QKVRope,
    count_fused_calls,
    fresh_compile,
    positions_for,
    rope_counters,
    tokens,
)
from rope_compile.passes import fuse_qk_rope
from rope_compile.passes.fuse_qk_rope import DEFAULT_DEVICES, FuseQKRopePass
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

from rope_compile.backend import rope_compile_backend, split_options

T = 5


@pytest.fixture(scope="module")
def model_and_inputs():
    model = QKVRope()
    inputs = (positions_for(T), tokens(T))
    with torch.no_grad():
        expected = model(*inputs)
    return model, inputs, expected


def _run(model, inputs, backend="rope_compile", **compile_kwargs):
    with fresh_compile():
        out, codes = run_and_get_code(torch.compile(model, backend=backend, **compile_kwargs),
                                      *inputs)
        counts = rope_counters()
    return out, "\n".join(codes), counts


def _assert_same(out, expected, tol=1e-5):
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------
# registration


def test_resolves_by_name_through_entry_point():
    assert "rope_compile" in torch._dynamo.list_backends()
    assert "rope_compile" in torch._dynamo.list_backends(exclude_tags=())
    assert torch._dynamo.lookup_backend("rope_compile") is rope_compile_backend


def test_entry_point_declared():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "rope_compile"]
    assert ep.value == "rope_compile.backend:rope_compile_backend"
    assert ep.load() is rope_compile_backend


# --------------------------------------------------------------------------------------------
# options


def test_default_options_do_not_rewrite_on_cpu(model_and_inputs):
    model, inputs, expected = model_and_inputs
    out, code, counts = _run(model, inputs)
    assert DEFAULT_DEVICES == ("xpu", "cuda")
    assert counts == {"pairs_found": 1, "skipped: device cpu not in ('xpu', 'cuda')": 1}
    assert count_fused_calls(code) == 0
    _assert_same(out, expected)


@pytest.mark.parametrize("devices", [("cpu",), ["cpu"], ("cuda", "cpu")],
                         ids=["tuple", "list", "with-cuda"])
def test_devices_cpu_rewrites(model_and_inputs, devices):
    model, inputs, expected = model_and_inputs
    out, code, counts = _run(model, inputs, options={"devices": devices})
    assert counts == {"pairs_found": 1, "rewritten": 1}
    assert count_fused_calls(code) == 1
    _assert_same(out, expected)


def test_split_options():
    assert split_options(None) == ({}, {})
    pass_opts, patches = split_options({"devices": ["cpu"], "head_sizes": (64,), "strict": True,
                                        "max_autotune": False})
    assert pass_opts == {"devices": ("cpu",), "head_sizes": (64,), "strict": True}
    assert patches == {"max_autotune": False}
    with pytest.raises(ValueError, match=r"`devices`.*bare str 'cpu'.*\('cpu',\)"):
        split_options({"devices": "cpu"})  # a bare str is rejected (see test_options.py)


def test_inductor_options_passed_through(model_and_inputs):
    """Non-pass keys of ``options`` are Inductor config patches (an unknown one is an error)."""
    model, inputs, expected = model_and_inputs
    out, code, counts = _run(model, inputs,
                             options={"devices": ("cpu",), "cpp.simdlen": 0, "strict": True})
    assert counts == {"pairs_found": 1, "rewritten": 1}
    _assert_same(out, expected)
    with pytest.raises(Exception, match="no_such_inductor_option"):
        _run(model, inputs, options={"devices": ("cpu",), "no_such_inductor_option": 1})


@pytest.mark.parametrize("user_value", [None, False])
def test_static_launch_of_our_kernel_unless_the_user_says_otherwise(monkeypatch, user_value):
    """The lowered kernel is a user-defined Triton kernel: the backend asks Inductor to launch
    those statically too (as its own), unless the options say otherwise."""
    import torch._inductor.compile_fx as compile_fx_module

    from rope_compile.backend import STATIC_LAUNCH_USER_KERNELS, rope_compile_backend

    if not hasattr(torch._inductor.config, STATIC_LAUNCH_USER_KERNELS):
        pytest.skip("this torch has no such option")
    seen = {}
    monkeypatch.setattr(compile_fx_module, "compile_fx",
                        lambda gm, inputs, config_patches: seen.update(config_patches))
    options = {} if user_value is None else {STATIC_LAUNCH_USER_KERNELS: user_value}
    rope_compile_backend(torch.fx.symbolic_trace(torch.nn.Identity()), [], options=options)
    assert seen[STATIC_LAUNCH_USER_KERNELS] is (True if user_value is None else user_value)


def test_config_not_leaked(model_and_inputs):
    model, inputs, _ = model_and_inputs
    before = torch._inductor.config.post_grad_custom_post_pass
    _run(model, inputs, options={"devices": ("cpu",)})
    assert torch._inductor.config.post_grad_custom_post_pass is before


# --------------------------------------------------------------------------------------------
# chaining with a user's post-grad pass


class CountingPass(CustomGraphPass):
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def __call__(self, graph: torch.fx.Graph) -> None:
        fused = any("auto_functionalized" in str(n.target) for n in graph.nodes)
        self.log.append((self.name, fused))

    def uuid(self) -> bytes:
        return self.name.encode()


@pytest.mark.parametrize("as_list", [False, True], ids=["single", "list"])
def test_user_post_grad_pass_still_runs(model_and_inputs, as_list):
    model, inputs, expected = model_and_inputs
    calls: list = []
    user = [CountingPass("a", calls), CountingPass("b", calls)] if as_list else \
        CountingPass("a", calls)
    with torch._inductor.config.patch(post_grad_custom_post_pass=user):
        out, code, counts = _run(model, inputs, options={"devices": ("cpu",), "strict": True})
        assert torch._inductor.config.post_grad_custom_post_pass is user
    # The user's passes ran once each, in order, before ours (they saw no fused op yet).
    assert calls == ([("a", False), ("b", False)] if as_list else [("a", False)])
    assert counts == {"pairs_found": 1, "rewritten": 1}
    assert count_fused_calls(code) == 1
    _assert_same(out, expected)


def test_user_post_grad_pass_in_options_still_runs(model_and_inputs):
    """A pass given in torch.compile's ``options`` is chained before ours, not dropped."""
    model, inputs, expected = model_and_inputs
    calls: list = []
    out, code, counts = _run(model, inputs, options={
        "devices": ("cpu",), "strict": True,
        "post_grad_custom_post_pass": CountingPass("opt", calls)})
    assert calls == [("opt", False)]
    assert counts == {"pairs_found": 1, "rewritten": 1}
    _assert_same(out, expected)


def test_configured_rope_pass_not_run_twice(model_and_inputs):
    """An older copy of the pass already in the config is replaced, not run again."""
    model, inputs, expected = model_and_inputs
    old = FuseQKRopePass(devices=("cpu",), head_sizes=(64,))  # would skip head 128
    with torch._inductor.config.patch(post_grad_custom_post_pass=old):
        out, code, counts = _run(model, inputs, options={"devices": ("cpu",)})
    assert counts == {"pairs_found": 1, "rewritten": 1}
    _assert_same(out, expected)


# --------------------------------------------------------------------------------------------
# modes


@pytest.mark.parametrize("mode", ["max-autotune-no-cudagraphs", "reduce-overhead"])
def test_modes_accepted_on_cpu(model_and_inputs, mode):
    model, inputs, expected = model_and_inputs
    out, _, counts = _run(model, inputs, mode=mode)
    assert counts.get("pairs_found") == 1  # the pass ran (default devices: no rewrite on CPU)
    _assert_same(out, expected)


@pytest.mark.parametrize("mode", ["max-autotune-no-cudagraphs", "reduce-overhead"])
def test_mode_with_pass_options(model_and_inputs, mode):
    """torch.compile takes mode or options, not both: call the backend with both directly."""
    model, inputs, expected = model_and_inputs

    def backend(gm, example_inputs):
        return rope_compile_backend(gm, example_inputs, mode=mode,
                                    options={"devices": ("cpu",), "strict": True})

    out, code, counts = _run(model, inputs, backend=backend)
    assert counts == {"pairs_found": 1, "rewritten": 1}
    assert count_fused_calls(code) == 1
    _assert_same(out, expected)


# --------------------------------------------------------------------------------------------
# uuid (FX graph cache key)


def test_uuid_depends_on_options():
    default = FuseQKRopePass().uuid()
    assert isinstance(default, bytes) and default
    assert FuseQKRopePass().uuid() == default
    assert FuseQKRopePass(head_sizes=(128, 256, 512)).uuid() == default
    assert FuseQKRopePass(head_sizes=[128, 256, 512], devices=["xpu", "cuda"]).uuid() == default
    others = [
        FuseQKRopePass(head_sizes=(128,)).uuid(),
        FuseQKRopePass(devices=("cpu",)).uuid(),
        FuseQKRopePass(devices=("xpu", "cuda", "cpu")).uuid(),
        FuseQKRopePass(strict=True).uuid(),
    ]
    assert default not in others
    assert len(set(others)) == len(others)
    assert FuseQKRopePass(head_sizes=(128,)).uuid() == FuseQKRopePass(head_sizes=(128,)).uuid()


# --------------------------------------------------------------------------------------------
# errors inside the pass


class InjectedError(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["rewrite_pair", "plan_pair"])
def test_strict_reraises(model_and_inputs, monkeypatch, where):
    model, inputs, _ = model_and_inputs

    def boom(*args, **kwargs):
        raise InjectedError(f"injected failure in {where}")

    monkeypatch.setattr(fuse_qk_rope, where, boom)
    with pytest.raises(Exception, match=f"injected failure in {where}"):
        _run(model, inputs, options={"devices": ("cpu",), "strict": True})
    assert rope_counters().get("pass_errors") == 1


@pytest.mark.parametrize("where", ["rewrite_pair", "plan_pair"])
def test_non_strict_logs_and_leaves_graph(model_and_inputs, monkeypatch, caplog, where):
    model, inputs, expected = model_and_inputs

    def boom(*args, **kwargs):
        raise InjectedError(f"injected failure in {where}")

    monkeypatch.setattr(fuse_qk_rope, where, boom)
    with caplog.at_level(logging.WARNING, logger="rope_compile"):
        out, code, counts = _run(model, inputs, options={"devices": ("cpu",)})
    # The failing candidate is skipped alone (counted), the pass itself does not fail.
    assert counts.get("candidate_errors") == 1 and "pass_errors" not in counts
    assert "rewritten" not in counts
    assert count_fused_calls(code) == 0
    warnings = [r for r in caplog.records
                if r.name == "rope_compile" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"injected failure in {where}" in warnings[0].getMessage()
    _assert_same(out, expected)


def test_non_strict_failure_after_first_pair(monkeypatch, caplog):
    """Two layers, the second rewrite fails: the compile still works and computes the same (the
    first pair stays rewritten, the second is rolled back alone)."""
    model = AttnStack(num_layers=2)
    inputs = (positions_for(T, 512), tokens(T))
    with torch.no_grad():
        expected = model(*inputs)
    real = fuse_qk_rope.rewrite_pair
    calls = []

    def second_fails(graph, plan, *rest):
        calls.append(plan)
        if len(calls) == 2:
            raise InjectedError("injected failure in the second rewrite")
        return real(graph, plan, *rest)

    monkeypatch.setattr(fuse_qk_rope, "rewrite_pair", second_fails)
    with caplog.at_level(logging.WARNING, logger="rope_compile"):
        out, code, counts = _run(model, inputs, options={"devices": ("cpu",)})
    assert counts == {"pairs_found": 2, "rewritten": 1, "candidate_errors": 1}
    assert count_fused_calls(code) == 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

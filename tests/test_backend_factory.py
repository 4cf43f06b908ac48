"""``rope_compile.backend(**options)`` checks the options before ``torch.compile`` is called;
``backend="rope_compile", options={...}`` checks them at the first call of the compiled model,
where dynamo wraps the ``ValueError`` in ``BackendCompilerFailed`` (as the backend's docstring
and docs/options.md say)."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import QKVRope, count_fused_calls, fresh_compile, positions_for, rope_counters
from pass_helpers import tokens as make_tokens
from test_options import BAD_BACKEND_OPTIONS
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.utils import run_and_get_code

import rope_compile
from rope_compile.backend import RopeCompileBackend, make_backend, rope_compile_backend

T = 5


@pytest.mark.parametrize("options,expected", list(BAD_BACKEND_OPTIONS.values()),
                         ids=list(BAD_BACKEND_OPTIONS))
def test_factory_rejects_a_bad_option_at_once(options, expected):
    with pytest.raises(ValueError) as info:
        rope_compile.backend(**options)
    for text in expected:
        assert text in str(info.value)


@pytest.mark.parametrize("mode,expected", [("max_autotune", "did you mean 'max-autotune'?"),
                                           ("fast", "must be one of"), (1, "got 1")])
def test_factory_rejects_a_bad_mode(mode, expected):
    with pytest.raises(ValueError, match="`mode`") as info:
        rope_compile.backend(mode=mode)
    assert expected in str(info.value)


def test_factory_takes_keywords_only():
    with pytest.raises(TypeError, match=r"as keywords.*rope_compile.backend\(\*\*options\)"):
        rope_compile.backend({"strict": True})


def test_factory_is_the_module_and_make_backend():
    backend = rope_compile.backend(devices=("cpu",), strict=True, mode="reduce-overhead")
    assert isinstance(backend, RopeCompileBackend)
    assert backend.__name__ == "rope_compile"
    assert repr(backend) == ("rope_compile.backend(mode='reduce-overhead', devices=('cpu',), "
                             "strict=True)")
    assert backend.pass_options == {"devices": ("cpu",), "strict": True}
    assert repr(make_backend(head_sizes=[64])) == "rope_compile.backend(head_sizes=[64])"
    assert make_backend(head_sizes=[64]).pass_options == {"head_sizes": (64,)}
    # The module keeps its names; the registered backend is unchanged.
    assert rope_compile.backend.rope_compile_backend is rope_compile_backend
    assert torch._dynamo.lookup_backend("rope_compile") is rope_compile_backend


def _compile_and_check(backend, **compile_kwargs):
    model = QKVRope()  # head size 128
    inputs = (positions_for(T), make_tokens(T))
    with torch.no_grad():
        expected = model(*inputs)
    with fresh_compile():
        out, codes = run_and_get_code(torch.compile(model, backend=backend, **compile_kwargs),
                                      *inputs)
        counts = rope_counters()
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return counts, count_fused_calls("\n".join(codes))


@pytest.mark.parametrize("backend", [
    pytest.param(lambda: rope_compile.backend(devices=("cpu",)), id="factory"),
    pytest.param(lambda: rope_compile.backend(**{"devices": ("cpu",), "max_autotune": False}),
                 id="factory-with-an-inductor-patch"),
])
def test_factory_backend_compiles_and_rewrites(backend):
    assert _compile_and_check(backend()) == ({"pairs_found": 1, "rewritten": 1}, 1)


def test_options_given_to_torch_compile_add_to_the_bound_ones():
    """Bound ``devices=("cpu",)``; ``head_sizes=(64,)`` from torch.compile leaves the head-size
    128 pair alone, which only the merge of both explains."""
    counts, calls = _compile_and_check(rope_compile.backend(devices=("cpu",)),
                                       options={"head_sizes": (64,)})
    assert counts.get("rewritten", 0) == 0 and calls == 0
    assert any(key.startswith("skipped: head_size 128") for key in counts), counts


def test_the_module_itself_is_a_backend():
    counts, calls = _compile_and_check(rope_compile.backend, options={"devices": ("cpu",)})
    assert (counts, calls) == ({"pairs_found": 1, "rewritten": 1}, 1)


def _first_call(backend, **compile_kwargs):
    def f(x):
        return x * 2

    with fresh_compile():
        compiled = torch.compile(f, backend=backend, **compile_kwargs)  # returns normally
        with pytest.raises(BackendCompilerFailed) as info:
            compiled(torch.ones(3))
    return info.value


def test_by_name_a_bad_option_fails_at_the_first_call():
    err = _first_call("rope_compile", options={"head_size": (128,)})
    assert isinstance(err.inner_exception, ValueError)
    assert "`head_size`" in str(err) and "'head_sizes'" in str(err)


def test_factory_with_a_bad_option_from_torch_compile_fails_at_the_first_call():
    err = _first_call(rope_compile.backend(devices=("cpu",)), options={"strict": 1})
    assert isinstance(err.inner_exception, ValueError)
    assert "`strict`" in str(err)

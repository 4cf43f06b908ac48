"""The installed litgpt, torchtune and torchtitan packages' own model code under
``backend="rope_compile"`` on the CPU: a prefill and a one-token decode step (with the package's
own KV cache where it has one), each RoPE rewritten once per layer with eager's values, and
every other outcome a counted reason, never silent.

Tested versions (pinned in ``.ci/run``, installed ``--no-deps``): litgpt 0.5.13, torchtune 0.6.1,
torchtitan 0.3.0. Only their model modules are imported, without their package ``__init__``
(which pulls lightning, torchao, datasets, ...): :func:`model_code` registers each parent package
as a bare namespace over the installed files. litgpt's ``litgpt.model`` imports
``qkv_reassemble`` from its checkpoint converter (lightning at import time); a stub stands in
for that module, which the forward pass never calls. A package that is absent is a skip naming
the install command.

* litgpt ``GPT``: ``cos[:T]`` / ``batched_index_select(cos, 0, input_pos)`` then
  ``.view(1, 1, T, n)`` in ``apply_rope``; ``set_kv_cache`` and ``input_pos``.
* torchtune ``MultiHeadAttention`` with its ``KVCache``: ``RotaryPositionalEmbeddings`` (llama3),
  ``Llama3ScaledRoPE`` (llama3.1) and ``Qwen2RotaryPositionalEmbeddings`` (cos and sin column
  slices of one ``cat([cos, sin])`` cache), ``input_pos`` ``[1, T]`` and ``[1, 1]``.
* torchtitan ``ComplexRoPE`` (plain and llama scaling) and ``CosSinRoPE`` (column slices of one
  cache), through their ``forward(q, k, positions)``; torchtitan has no KV cache, so its decode
  step is one token with ``positions`` ``[1, 1]`` (its singleton-positions path).

Plus copy-free spellings of the fixes of issue 24 (no package needed): torchtune's pair rows
gathered with 2-D positions (``[1, T]``, ``[1, 1]``), and the QK-norm pass in front of a RoPE
call that reads full ``[R, rot]`` tables (a counted skip with its reason, not the op's
rejection).
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import count_fused_calls, fresh_compile, rope_counters
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

PINS = {"litgpt": "0.5.13", "torchtune": "0.6.1", "torchtitan": "0.3.0"}
OPTIONS = {"devices": ("cpu",), "strict": True, "skip_pairs_only_read_by_copies": False,
           "head_sizes": (128,)}
LAYERS, T, HIDDEN, HQ, HK, D, MAX_SEQ = 2, 6, 256, 4, 2, 128, 32
# The KV-store pass cannot extend these calls (passes/fuse_kv_store.py): counted skips.
KV_FULL_TABLES = ("kv_store skipped: the RoPE call reads full cos/sin tables [R, rotary_dim = "
                  "128] (their equal halves are not proven); the KV-store ops read pair tables "
                  "[R, rotary_dim/2] only")
KV_CACHE_LOC = "kv_store skipped: k and v are written at different cache_loc"


# --------------------------------------------------------------------------------------------
# importing the packages' model code


def _require(package: str) -> None:
    """Skip unless ``package`` is installed at its pinned version."""
    try:
        found = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{package} is not installed (pip install --no-deps "
                    f"{package}=={PINS[package]})")
    if found != PINS[package]:
        pytest.skip(f"{package} {found} installed; these tests pin {PINS[package]}")


def model_code(name: str, stubs: dict[str, dict] | None = None):
    """Import module ``name`` of an installed package without running the ``__init__`` of its
    parent packages: each parent not yet imported is registered as a bare package over its
    installed directory. ``stubs``: modules registered as plain namespaces with these
    attributes instead of being imported."""
    for stub, attrs in (stubs or {}).items():
        if stub not in sys.modules:
            module = types.ModuleType(stub)
            module.__dict__.update(attrs)
            sys.modules[stub] = module
    parts = name.split(".")
    for i in range(1, len(parts)):
        package = ".".join(parts[:i])
        if package in sys.modules:
            continue
        if i == 1:
            spec = importlib.util.find_spec(package)
            path = list(spec.submodule_search_locations)
        else:
            parent = sys.modules[".".join(parts[:i - 1])]
            path = [f"{p}/{parts[i - 1]}" for p in parent.__path__]
        module = types.ModuleType(package)
        module.__path__ = path
        module.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
        module.__spec__.submodule_search_locations = path
        sys.modules[package] = module
    return importlib.import_module(name)


# --------------------------------------------------------------------------------------------
# compiling a model step by step against eager


def run_steps(model: nn.Module, steps, options=OPTIONS) -> list[dict]:
    """Run ``steps`` ([(args, kwargs)], e.g. a prefill then a decode step) on ``model`` in eager
    and on a deep copy compiled with the backend (each keeps its own KV cache); check each
    step's output against eager's. Returns each step's counters, with ``"fused calls"``: the
    fused op calls in the code compiled for that step."""
    eager, compiled = model, copy.deepcopy(model)
    results = []
    with fresh_compile():
        fn = torch.compile(compiled, backend="rope_compile", options=dict(options))
        for args, kwargs in steps:
            counters.clear()
            expected = eager(*args, **kwargs)
            out, codes = run_and_get_code(fn, *args, **kwargs)
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
            counts = rope_counters()
            counts["fused calls"] = count_fused_calls("\n".join(codes))
            results.append(counts)
    return results


def assert_rewritten(counts: dict, layers: int = LAYERS, skipped=()) -> None:
    """Each layer's RoPE pair rewritten once (one fused call each), nothing missed, and the
    only other counters are the extension passes' ``skipped`` reasons given."""
    assert counts.get("pairs_found") == layers and counts.get("rewritten") == layers, counts
    assert counts["fused calls"] == layers, counts
    rest = {k: v for k, v in counts.items()
            if k not in ("pairs_found", "rewritten", "fused calls")}
    assert rest == {reason: layers for reason in skipped}, counts


def _tokens(batch: int = 1, seq: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# litgpt 0.5.13: GPT with its KV cache


def _litgpt_gpt():
    _require("litgpt")
    config_mod = model_code("litgpt.config")
    model_mod = model_code("litgpt.model", stubs={
        "litgpt.scripts": {"__path__": []},
        "litgpt.scripts.convert_hf_checkpoint": {"qkv_reassemble": None}})
    config = config_mod.Config(
        n_layer=LAYERS, n_head=HQ, n_query_groups=HK, n_embd=HIDDEN, head_size=D,
        block_size=MAX_SEQ, vocab_size=64, padded_vocab_size=64, rotary_percentage=1.0,
        bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=256,
        parallel_residual=False)
    torch.manual_seed(0)
    return model_mod.GPT(config).eval()


def test_litgpt_prefill():
    """``GPT.forward(idx)``: ``cos[:T].unsqueeze(0)`` viewed ``(1, 1, T, n)``."""
    idx = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(2))
    (prefill,) = run_steps(_litgpt_gpt(), [((idx,), {})])
    assert_rewritten(prefill)


def test_litgpt_kv_cache_prefill_and_decode():
    """``set_kv_cache``, a prefill at ``input_pos = arange(T)`` and one token at ``[T]``
    (``batched_index_select(cos, 0, input_pos)``). The tables are litgpt's buffers: full
    ``[R, 128]`` tables (equal halves not provable), which the KV-store op does not read."""
    model = _litgpt_gpt()
    model.set_kv_cache(batch_size=1, max_seq_length=MAX_SEQ)
    idx = torch.randint(0, 64, (1, T + 1), generator=torch.Generator().manual_seed(2))
    prefill, decode = run_steps(model, [
        ((idx[:, :T],), {"input_pos": torch.arange(T)}),
        ((idx[:, T:],), {"input_pos": torch.tensor([T])})])
    assert_rewritten(prefill, skipped=[KV_FULL_TABLES])
    assert_rewritten(decode, skipped=[KV_FULL_TABLES])


# --------------------------------------------------------------------------------------------
# torchtune 0.6.1: MultiHeadAttention with its KVCache


def _torchtune_rope(kind: str) -> nn.Module:
    _require("torchtune")
    if kind == "llama3":
        return model_code("torchtune.modules.position_embeddings").RotaryPositionalEmbeddings(
            D, MAX_SEQ)
    if kind == "llama3.1":
        return model_code("torchtune.models.llama3_1._position_embeddings").Llama3ScaledRoPE(
            D, MAX_SEQ)
    return model_code("torchtune.models.qwen2._positional_embeddings"
                      ).Qwen2RotaryPositionalEmbeddings(D, MAX_SEQ)


class TorchtuneStack(nn.Module):
    """``LAYERS`` of torchtune's ``MultiHeadAttention`` (GQA) sharing one RoPE module, each
    with a residual."""

    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        attention = model_code("torchtune.modules.attention")
        torch.manual_seed(0)
        self.layers = nn.ModuleList(attention.MultiHeadAttention(
            embed_dim=HIDDEN, num_heads=HQ, num_kv_heads=HK, head_dim=D,
            q_proj=nn.Linear(HIDDEN, HQ * D, bias=False),
            k_proj=nn.Linear(HIDDEN, HK * D, bias=False),
            v_proj=nn.Linear(HIDDEN, HK * D, bias=False),
            output_proj=nn.Linear(HQ * D, HIDDEN, bias=False),
            pos_embeddings=rope, max_seq_len=MAX_SEQ) for _ in range(LAYERS))

    def forward(self, x, mask=None, input_pos=None):
        for layer in self.layers:
            x = x + layer(x, x, mask=mask, input_pos=input_pos)
        return x


TORCHTUNE = ("llama3", "llama3.1", "qwen2")


@pytest.mark.parametrize("kind", TORCHTUNE)
def test_torchtune_prefill(kind):
    (prefill,) = run_steps(TorchtuneStack(_torchtune_rope(kind)).eval(), [((_tokens(),), {})])
    assert_rewritten(prefill)


@pytest.mark.parametrize("kind", TORCHTUNE)
def test_torchtune_kv_cache_prefill_and_decode(kind):
    """``setup_cache``, a prefill with ``input_pos`` ``[1, T]`` and one token with ``[[T]]``
    (torchtune's generation shapes; llama3's ``cache[input_pos]`` pair rows ``[1, T, 64, 2]``).
    torchtune's ``KVCache.update`` indexes k and v by two slices of ``cache_pos``: the KV-store
    pass leaves the write to Inductor with its reason."""
    model = TorchtuneStack(_torchtune_rope(kind)).eval()
    for layer in model.layers:
        layer.setup_cache(1, torch.float32, MAX_SEQ)
    mask = torch.tril(torch.ones(MAX_SEQ, MAX_SEQ, dtype=torch.bool))[None]
    x = _tokens(seq=T + 1)
    prefill, decode = run_steps(model, [
        ((x[:, :T],), {"mask": mask[:, :T], "input_pos": torch.arange(T)[None]}),
        ((x[:, T:],), {"mask": mask[:, T:T + 1], "input_pos": torch.tensor([[T]])})])
    assert_rewritten(prefill, skipped=[KV_CACHE_LOC])
    assert_rewritten(decode, skipped=[KV_CACHE_LOC])


# --------------------------------------------------------------------------------------------
# torchtitan 0.3.0: ComplexRoPE and CosSinRoPE


class TitanLayer(nn.Module):
    """q/k/v ``[B, T, H, D]`` projections, torchtitan's ``rope(q, k, positions)``, SDPA."""

    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        self.rope = rope
        self.wq = nn.Linear(HIDDEN, HQ * D, bias=False)
        self.wk = nn.Linear(HIDDEN, HK * D, bias=False)
        self.wv = nn.Linear(HIDDEN, HK * D, bias=False)
        self.wo = nn.Linear(HQ * D, HIDDEN, bias=False)

    def forward(self, x, positions=None):
        b, t, _ = x.shape
        q, k = self.wq(x).view(b, t, HQ, D), self.wk(x).view(b, t, HK, D)
        v = self.wv(x).view(b, t, HK, D)
        q, k = self.rope(q, k, positions)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=t > 1, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class TitanStack(nn.Module):
    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(TitanLayer(rope) for _ in range(LAYERS))

    def forward(self, x, positions=None):
        for layer in self.layers:
            x = x + layer(x, positions)
        return x


TITAN = {"ComplexRoPE": ("ComplexRoPE", "none"), "ComplexRoPE llama": ("ComplexRoPE", "llama"),
         "CosSinRoPE": ("CosSinRoPE", "none")}


@pytest.mark.parametrize("name", list(TITAN))
def test_torchtitan_prefill_and_decode(name):
    """A prefill without positions, one with ``positions`` ``[1, T]``, and a one-token step at
    ``[[T]]``."""
    _require("torchtitan")
    rope_mod = model_code("torchtitan.models.common.rope")
    cls_name, scaling = TITAN[name]
    cls = getattr(rope_mod, cls_name)
    rope = cls(cls.Config(dim=D, max_seq_len=MAX_SEQ, scaling=scaling))
    x = _tokens(seq=T + 1)
    for counts in run_steps(TitanStack(rope).eval(), [
            ((x[:, :T],), {}),
            ((x[:, :T], torch.arange(T)[None]), {}),
            ((x[:, T:], torch.tensor([[T]])), {})]):
        assert_rewritten(counts)


# --------------------------------------------------------------------------------------------
# copy-free: pair rows gathered with 2-D positions (torchtune's generation shapes)


def _pair_cache(seq: int = MAX_SEQ) -> torch.Tensor:
    theta = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    angles = torch.outer(torch.arange(seq).float(), theta)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # [seq, D/2, 2]


def pair_rope(x, cache, input_pos, spread_over_heads=False):
    """torchtune's ``RotaryPositionalEmbeddings.forward`` body on ``x`` ``[B, T, H, D]``;
    ``spread_over_heads``: the rows expanded over x's heads first (the same values)."""
    rows = cache[input_pos].view(-1, x.size(1), 1, x.size(3) // 2, 2)
    if spread_over_heads:
        rows = rows.expand(-1, -1, x.size(2), -1, -1)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    out = torch.stack([xs[..., 0] * rows[..., 0] - xs[..., 1] * rows[..., 1],
                       xs[..., 1] * rows[..., 0] + xs[..., 0] * rows[..., 1]], -1)
    return out.flatten(3).type_as(x)


class PairLayer(nn.Module):
    def __init__(self, spread_over_heads: bool = False) -> None:
        super().__init__()
        self.spread = spread_over_heads
        self.wqkv = nn.Linear(HIDDEN, (HQ + 2 * HK) * D, bias=False)
        self.wo = nn.Linear(HQ * D, HIDDEN, bias=False)

    def forward(self, x, cache, input_pos):
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split([HQ * D, HK * D, HK * D], -1)
        q, k, v = q.view(b, t, HQ, D), k.view(b, t, HK, D), v.view(b, t, HK, D)
        q = pair_rope(q, cache, input_pos, self.spread)
        k = pair_rope(k, cache, input_pos, self.spread)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class PairStack(nn.Module):
    def __init__(self, spread_over_heads: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(PairLayer(spread_over_heads) for _ in range(LAYERS))
        self.register_buffer("cache", _pair_cache(), persistent=False)

    def forward(self, x, input_pos):
        for layer in self.layers:
            x = x + layer(x, self.cache, input_pos)
        return x


POSITIONS = {"[1, T]": lambda: torch.arange(3, 3 + T)[None],
             "[1, 1] (decode)": lambda: torch.tensor([[7]]),
             "[2, T]": lambda: torch.stack([torch.arange(T), torch.arange(5, 5 + T)]),
             "[T]": lambda: torch.arange(3, 3 + T)}


@pytest.mark.parametrize("positions", list(POSITIONS))
def test_pair_rows_with_2d_positions_fused(positions):
    """``cache[input_pos]`` with ``[B, T]`` positions (rows ``[B, T, D/2, 2]``, size-1 dims
    at batch 1 or one token) broadcast over heads: rewritten once per layer."""
    input_pos = POSITIONS[positions]()
    x = _tokens(batch=input_pos.shape[0] if input_pos.dim() == 2 else 1,
                seq=input_pos.shape[-1])
    (counts,) = run_steps(PairStack().eval(), [((x, input_pos), {})])
    assert_rewritten(counts)


SPREAD_REASON = ("(cos, sin) pair picks are not rows read per token: cos/sin pairs are not "
                 "gathered or sliced rows")


def test_pair_rows_spread_over_heads_is_a_counted_miss(caplog):
    """The one-token rows expanded over x's heads before the picks: not read as per-token
    rows; each RoPE a counted miss naming the pair step that failed (not the rotation's
    "second half" that follows from it), with a DEBUG line, eager's values."""
    options = {**OPTIONS, "strict": False}
    x = _tokens(seq=1)
    with caplog.at_level(logging.DEBUG, logger="rope_compile"):
        (counts,) = run_steps(PairStack(spread_over_heads=True).eval(),
                              [((x, torch.tensor([[7]])), {})], options)
    missed = {k: v for k, v in counts.items() if k.startswith("missed: ")}
    assert "rewritten" not in counts and counts["fused calls"] == 0, counts
    assert missed == {f"missed: {SPREAD_REASON}": 2 * LAYERS}, counts
    lines = [r.getMessage() for r in caplog.records
             if r.name == "rope_compile" and "RoPE-like" in r.getMessage()]
    assert len(lines) == 2 * LAYERS, lines


# --------------------------------------------------------------------------------------------
# copy-free: the QK-norm pass in front of a RoPE call reading full tables


def _rms_norm(x, weight, eps=1e-6):
    """HF Qwen3's ``Qwen3RMSNorm``."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _hf_rope(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class NormLayer(nn.Module):
    """Qwen3's attention prologue: per-head q/k RMSNorm, HF RoPE with ``[1, 1, T, D]`` cos and
    sin, SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.wqkv = nn.Linear(HIDDEN, (HQ + 2 * HK) * D, bias=False)
        self.wo = nn.Linear(HQ * D, HIDDEN, bias=False)
        self.q_norm = nn.Parameter(1 + 0.1 * torch.randn(D))
        self.k_norm = nn.Parameter(1 + 0.1 * torch.randn(D))

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split([HQ * D, HK * D, HK * D], -1)
        q = _rms_norm(q.view(b, t, HQ, D), self.q_norm).transpose(1, 2)
        k = _rms_norm(k.view(b, t, HK, D), self.k_norm).transpose(1, 2)
        q, k = _hf_rope(q, cos, sin), _hf_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v.view(b, t, HK, D).transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class NormStack(nn.Module):
    """``tables="inputs"``: cos/sin passed in (full tables, halves not provable);
    ``"computed"``: ``cat(f, f).cos()`` of the positions in the graph (pair tables)."""

    def __init__(self, tables: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tables = tables
        self.layers = nn.ModuleList(NormLayer() for _ in range(LAYERS))
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)),
                             persistent=False)

    def forward(self, x, *tables):
        if self.tables == "computed":
            freqs = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            tables = (emb.cos()[None, None], emb.sin()[None, None])
        for layer in self.layers:
            x = x + layer(x, *tables)
        return x


FULL_TABLES_NORM = ("qk_norm skipped: the RoPE call reads full cos/sin tables [R, rotary_dim = "
                    "128] (their equal halves are not proven); the QK-norm ops read pair "
                    "tables [R, rotary_dim/2] only")


def test_qk_norm_before_full_tables_is_a_counted_skip():
    """cos/sin graph inputs ``[1, 1, T, D]``: the RoPE call reads them as full tables; the
    QK-norm pass keeps that form and skips with its reason (it used to plan a pair-table call
    and count the op's rejection, ``cos must be [rows, rotary_dim/2 = 64]``)."""
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * (
        1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)))
    emb = torch.cat((freqs, freqs), dim=-1)
    (counts,) = run_steps(NormStack("inputs").eval(),
                          [((_tokens(), emb.cos()[None, None], emb.sin()[None, None]), {})])
    assert_rewritten(counts, skipped=[FULL_TABLES_NORM])


def test_qk_norm_before_pair_tables_fused():
    """The same layers with cos/sin computed in the graph (halves proven equal): the norm
    joins the call."""
    (counts,) = run_steps(NormStack("computed").eval(), [((_tokens(),), {})])
    assert_rewritten(counts, skipped=["qk_norm rewritten"])

"""Every causal-LM family of the installed transformers that applies RoPE, built tiny, through
``backend="rope_compile"`` (CPU, forced on), against a checked-in table of outcomes.

**Which families.** A family is a ``model_type`` of transformers' causal-LM auto mapping
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) whose causal-LM class is defined in a modeling file
(``transformers/models/*/modeling_*.py``) that defines a function whose name contains
``rotary`` or ``rotate`` (``apply_rotary_pos_emb``, ``rotate_half``, ``rotate_every_two``,
``_apply_rotary_emb``, ``apply_rotary_pos_emb_interleave``, ...). Config-only model types that
reuse another family's class (``exaone`` -> ``LlamaForCausalLM``) are families of their own: their
configs differ. The criterion reads source text only (no modeling module is imported), so the
enumeration check is cheap.

**What is run.** Each family is built from its config class's defaults with the sizes below
(2 layers, hidden 256, 2 query heads and 1 kv head of 128, head_dim 128 where the config has it,
small MoE and vocabulary; sub-configs such as a ``text_config`` or ``vision_config`` shrunk the
same way), random weights after ``torch.manual_seed(0)``, float32. A prefill of ``[2, 7]`` token
ids is run eagerly, counting the outermost calls of the modeling file's RoPE functions (a call
returning a (q, k) pair is one RoPE layer, one returning a single tensor half of one), then
compiled with ``backend="rope_compile"`` and :data:`OPTIONS`.

**Outcomes** (one per family, :func:`family_outcome`):

* ``rewritten``: counter ``rewritten`` equals the number of RoPE layers, no ``error`` counter;
* ``partial``: some but not all RoPE layers rewritten (the reason lists the skips and misses);
* ``skipped`` / ``missed``: nothing rewritten; the reason is the counters' ``skipped: ...`` /
  ``missed: ...`` keys;
* ``unreported``: nothing rewritten and no counted reason;
* ``error``: a ``... error`` counter (a pass raised on a candidate);
* ``no rope layer``: the tiny prefill never called a RoPE function (hybrids whose first two
  layers have no attention, RoPE in a method the criterion does not patch);
* ``not buildable tiny``: the config, the model or its eager prefill raised (the exception);
* ``compile failed``: the compiled prefill raised.

Values ALWAYS equal eager (float32, ``atol = rtol = 1e-4``) for every family that compiles: a
hard assertion, whatever the table says.

**Running.** By default (CI) the test checks the enumeration against the table (no compile) and
compiles :data:`SAMPLE`. ``ROPE_HF_FAMILIES=all`` runs every family
(``ROPE_HF_FAMILIES=llama,qwen3`` a list); ``ROPE_HF_FAMILIES_OUT=path`` appends each family's
outcome there as one JSON line (to refill the table after a transformers upgrade). The table is
``tests/hf_rope_families.json``: ``{model_type: [outcome, reason]}``, for transformers
:data:`TABLE_VERSION`; with another version installed the table check is skipped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import re
import threading

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init only: never reach the Hub
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from pass_helpers import fresh_compile, rope_counters  # noqa: E402

TABLE_PATH = pathlib.Path(__file__).with_name("hf_rope_families.json")
TABLE_VERSION = "5.25.0"
OPTIONS = {"devices": ("cpu",), "skip_pairs_only_read_by_copies": False,
           "head_sizes": (64, 96, 128, 256)}
# compiled by default (CI): four spellings that rewrite and one counted miss (about 25 s)
SAMPLE = ("llama", "gpt_neox", "cohere", "qwen3", "deepseek_v3")
TOL = {"atol": 1e-4, "rtol": 1e-4}
VOCAB = 256
LAYERS = 2
ROPE_DEF = re.compile(r"^\s*def (\w*rotary\w*|\w*rotate\w*)\(", re.M)

# the tiny sizes, set where the (sub-)config has the attribute
SIZES = {
    "num_hidden_layers": LAYERS,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "max_position_embeddings": 256,
    "vocab_size": VOCAB,
}


def _models_root() -> pathlib.Path:
    return pathlib.Path(transformers.__file__).parent / "models"


@functools.cache
def rope_families() -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """``{model_type: (causal-LM class, modeling file's folder, RoPE function names)}``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    defined: dict[str, tuple[str, str]] = {}
    for path in sorted(_models_root().glob("*/modeling_*.py")):
        src = path.read_text(encoding="utf-8")
        for m in re.finditer(r"^class (\w+)\(", src, re.M):
            defined.setdefault(m.group(1), (path.parent.name, src))
    found = {}
    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if isinstance(cls, (tuple, list)):
            cls = cls[0]
        if cls not in defined:
            continue
        folder, src = defined[cls]
        names = tuple(sorted(set(ROPE_DEF.findall(src))))
        if names:
            found[model_type] = (cls, folder, names)
    return found


def load_table() -> dict[str, list[str]]:
    return json.loads(TABLE_PATH.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# building


# per-family changes to SIZES, where a family's config constrains them
FAMILY_SIZES = {
    "diffllama": {"num_key_value_heads": 2},  # differential attention splits the kv heads
}
_ATTENTION_LAYER = re.compile(r"^(?!linear)\w*attention$|^(attention|hybrid|full|global|\*)$")


def _get(cfg, name):
    try:
        return getattr(cfg, name)
    except Exception:  # noqa: BLE001 - absent, or a per-layer attribute with no global value
        return None


def _set(cfg, name, value) -> None:
    with contextlib.suppress(Exception):  # a read-only property
        setattr(cfg, name, value)


def _shrink(cfg, sizes: dict, vocab: int = VOCAB) -> None:
    """Set the tiny sizes on ``cfg`` and (recursively) its sub-configs, in place."""
    n_default = _get(cfg, "num_hidden_layers")
    mla = _get(cfg, "kv_lora_rank") is not None or _get(cfg, "qk_rope_head_dim") is not None
    for name, value in sizes.items():
        if mla and name in ("head_dim", "num_key_value_heads"):
            continue  # MLA: the rotary width is qk_rope_head_dim, kv heads are q heads
        if _get(cfg, name) is not None:
            _set(cfg, name, value)
    if mla and _get(cfg, "num_key_value_heads") is not None:
        _set(cfg, "num_key_value_heads", _get(cfg, "num_attention_heads"))
    for name, value in list(vars(cfg).items()):
        if isinstance(value, bool):
            continue
        low = name.lower()
        if isinstance(value, int):
            if "intermediate_size" in low and value > 512:
                _set(cfg, name, 128 if "moe" in low or "expert" in low else 512)
            elif low in ("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "topk",
                         "num_experts_per_token", "n_activated_experts") and value > 2:
                _set(cfg, name, 2)
            elif "expert" in low and "shared" not in low and value > 4:
                _set(cfg, name, 4)
            elif (("shared_expert" in low or low in ("n_group", "topk_group"))
                  and value > 1):
                _set(cfg, name, 1)
            elif (low.endswith("token_id") or low.endswith("token_index")) and value >= vocab:
                _set(cfg, name, vocab - 1 - len(low) % 16)
            elif low == "attn_layer_offset" and value >= LAYERS:
                _set(cfg, name, 1)  # a hybrid: its second layer attends
            elif low == "attn_layer_period" and value > LAYERS:
                _set(cfg, name, LAYERS)
        elif ((value is None and low == "attn_layer_indices")
              or (low == "hybrid_layer_ids" and isinstance(value, list))):
            _set(cfg, name, [1])
        elif isinstance(value, list) and n_default and len(value) == n_default and n_default > 2:
            head = value[:LAYERS]  # per-layer lists: the first two layers
            kinds = [v for v in value if isinstance(v, str) and _ATTENTION_LAYER.match(v)]
            if kinds and not any(isinstance(v, str) and _ATTENTION_LAYER.match(v) for v in head):
                head = [head[0], kinds[0]]  # a hybrid: keep one attention layer
            _set(cfg, name, head)
        elif isinstance(value, transformers.PretrainedConfig):
            _shrink(value, sizes, vocab)
        elif isinstance(value, (list, tuple)) and name.endswith("token_id"):
            _set(cfg, name, [t if t < vocab else 0 for t in value])


def _set_attn(cfg, impl: str) -> None:
    cfg._attn_implementation = impl
    for sub in vars(cfg).values():
        if isinstance(sub, transformers.PretrainedConfig):
            sub._attn_implementation = impl


def build_tiny(model_type: str):
    """The family's causal-LM model, tiny, random (seed 0), float32, eval; SDPA attention, or
    the family's eager attention where it has no SDPA."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls_name = rope_families()[model_type][0]
    model_cls = getattr(transformers, cls_name)
    cfg = CONFIG_MAPPING[model_type]()
    want = getattr(model_cls, "config_class", None)
    text = vars(cfg).get("text_config")
    if want is not None and not isinstance(cfg, want) and isinstance(text, want):
        cfg = text  # a text-only causal LM of a composite config
    _shrink(cfg, {**SIZES, **FAMILY_SIZES.get(model_type, {})})
    if "pad_token_id" not in vars(cfg) and not hasattr(type(cfg), "pad_token_id"):
        cfg.pad_token_id = None
    _set_attn(cfg, "sdpa")
    torch.manual_seed(0)
    try:
        model = model_cls(cfg)
    except ValueError as exc:
        if "attention implementation" not in str(exc) and "sdpa" not in str(exc).lower():
            raise
        _set_attn(cfg, "eager")
        torch.manual_seed(0)
        model = model_cls(cfg)
    return model.float().eval()


def _ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB // 2, (batch, seq), generator=g)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


class _RopeCallCounter:
    """Counts the outermost calls of a modeling module's RoPE ``apply`` functions (eager)."""

    def __init__(self, module) -> None:
        self.module = module
        self.names = [n for n in dir(module)
                      if re.search(r"apply\w*rotary|rotary\w*apply", n) and "vision" not in n
                      and callable(getattr(module, n))]
        self.layers = 0.0
        self._depth = threading.local()

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "d", 0)
            self._depth.d = depth + 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self._depth.d = depth
            if depth == 0:
                self.layers += 1.0 if isinstance(out, (tuple, list)) else 0.5
            return out
        return counted

    def __enter__(self):
        self._saved = {n: getattr(self.module, n) for n in self.names}
        for n, fn in self._saved.items():
            setattr(self.module, n, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for n, fn in self._saved.items():
            setattr(self.module, n, fn)


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:200] if msg else ''}"


def family_outcome(model_type: str) -> dict:
    """Build, run eager and compiled: ``{"outcome", "reason", "layers", "counters",
    "max_abs_diff", "values_equal"}`` (``values_equal`` None where nothing was compiled)."""
    import importlib

    _, folder, _ = rope_families()[model_type]
    result = {"family": model_type, "layers": None, "counters": {}, "max_abs_diff": None,
              "values_equal": None}
    ids = _ids()
    try:
        model = build_tiny(model_type)
        module = importlib.import_module(type(model).__module__)
        with torch.no_grad(), _RopeCallCounter(module) as counter:
            expected = _logits(model(ids))
        with torch.no_grad():
            expected = _logits(model(ids))  # unpatched: the reference
    except Exception as exc:  # noqa: BLE001 - recorded as the family's outcome
        return {**result, "outcome": "not buildable tiny", "reason": _one_line(exc)}
    layers = counter.layers
    result["layers"] = layers
    with fresh_compile():
        try:
            compiled = torch.compile(model, backend="rope_compile", options=OPTIONS)
            out = _logits(compiled(ids))
        except Exception as exc:  # noqa: BLE001
            return {**result, "outcome": "compile failed", "reason": _one_line(exc)}
        counts = rope_counters()
    result["counters"] = counts
    result["max_abs_diff"] = float((out - expected).abs().max())
    result["values_equal"] = bool(torch.allclose(out, expected, **TOL, equal_nan=True))
    rewritten = counts.get("rewritten", 0)
    errors = sorted(k for k in counts if "error" in k)
    reasons = sorted(k for k in counts if k.startswith(("skipped:", "missed:")))
    if errors:
        return {**result, "outcome": "error", "reason": "; ".join(errors)}
    if layers == 0:
        return {**result, "outcome": "no rope layer",
                "reason": f"no call of {counter.names} in the prefill"}
    if rewritten == layers:
        return {**result, "outcome": "rewritten", "reason": ""}
    if rewritten:
        return {**result, "outcome": "partial",
                "reason": f"rewritten {rewritten} of {layers:g}; " + "; ".join(reasons)}
    if any(r.startswith("missed:") for r in reasons):
        return {**result, "outcome": "missed",
                "reason": "; ".join(r for r in reasons if r.startswith("missed:"))}
    if reasons:
        return {**result, "outcome": "skipped", "reason": "; ".join(reasons)}
    return {**result, "outcome": "unreported", "reason": f"counters {counts}"}


# --------------------------------------------------------------------------------------------
# tests


def _selected() -> list[str]:
    env = os.environ.get("ROPE_HF_FAMILIES", "").strip()
    if env == "all":
        return sorted(rope_families())
    if env:
        return [f.strip() for f in env.split(",") if f.strip()]
    return list(SAMPLE)


def _table_or_skip() -> dict[str, list[str]]:
    if transformers.__version__ != TABLE_VERSION:
        pytest.skip(f"the table is for transformers {TABLE_VERSION}, "
                    f"{transformers.__version__} is installed")
    return load_table()


def test_enumeration_matches_table():
    """The installed transformers' RoPE families are the table's keys: a new family (or one
    gone) in another release fails here, naming it."""
    table = _table_or_skip()
    found = set(rope_families())
    assert not found - set(table), f"RoPE families not in the table: {sorted(found - set(table))}"
    assert not set(table) - found, f"table families not found: {sorted(set(table) - found)}"
    assert set(SAMPLE) <= found


@pytest.mark.parametrize("model_type", _selected())
def test_family(model_type):
    """One family: values equal eager (always), and the outcome is the table's."""
    result = family_outcome(model_type)
    out_path = os.environ.get("ROPE_HF_FAMILIES_OUT")
    if out_path:
        with open(out_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(result, sort_keys=True) + "\n")
    assert result["values_equal"] is not False, f"VALUES DIFFER FROM EAGER: {result}"
    table = _table_or_skip()
    assert model_type in table, f"{model_type} not in the table: {result}"
    assert [result["outcome"], result["reason"]] == table[model_type], result

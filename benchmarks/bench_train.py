"""Training-step benchmark: one forward + backward + optimizer step per iteration.

Models (bf16 on the GPU; random weights): HF Llama, HF Qwen3 (QK-norm) and the sglang-style
stack of ``rope_compile.demo`` (q/k/v views of one projection). Alternatives, compiled first
and then measured in interleaved rounds (the order reversed every other round):

* ``inductor``: plain ``torch.compile``;
* ``rope_compile``: ``torch.compile(backend="rope_compile")``;
* ``liger`` (HF models, where liger-kernel is importable): Liger's ``liger_rotary_pos_emb``
  patched into the model's modeling module, then plain ``torch.compile`` (Inductor keeps
  Liger's Triton RoPE as a user kernel).

Per model and alternative: kernels per step and GPU kernel time per step (``torch.profiler``,
the quieter of two interleaved profiles), RoPE GPU time per step (forward + backward: kernels
named ``rope`` for Liger and rope_compile; for Inductor, the kernels that run in only one of
the Inductor and rope_compile profiles, ``common.differing_kernels``), peak memory of a step,
and wall ms per step without and with CUDA graphs (``mode="reduce-overhead"``), the median of
``--rounds`` rounds with their spread. Gradients of one step are compared with Inductor's.

    python benchmarks/bench_train.py --json benchmarks/results/train_<date>.json
    python benchmarks/bench_train.py --device cpu --tiny   # a smoke run (numbers meaningless)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = ("llama", "qwen3", "sglang")
ALTERNATIVES = ("inductor", "rope_compile", "liger")
ROPE_KERNEL = re.compile(r"rope|rotary", re.I)


def _hf_config(name: str, tiny: bool):
    import transformers

    size = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1) if tiny else dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4)
    cls = transformers.LlamaConfig if name == "llama" else transformers.Qwen3Config
    return cls(vocab_size=1024, head_dim=128, max_position_embeddings=4096,
               attn_implementation="sdpa", use_cache=False, **size)


def build(name: str, alternative: str, device: str, dtype: torch.dtype, tiny: bool,
          batch: int, seq: int):
    """(model in train mode, a step's inputs, its loss function), from seed 0."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "sglang":
        from rope_compile.demo import TinyLlama

        hidden = 256 if tiny else 2048
        model = TinyLlama(layers=1 if tiny else 4, hidden=hidden, num_heads=2 if tiny else 16,
                          num_kv_heads=1 if tiny else 4, dtype=dtype)
        tokens = batch * seq
        inputs = (torch.arange(tokens, device=device) % seq,
                  torch.randn(tokens, hidden, generator=g).to(device, dtype))
        return model.to(device, dtype).train(), inputs, lambda out: out.float().pow(2).mean()
    import transformers

    if alternative == "liger":
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        module.apply_rotary_pos_emb = liger_rotary_pos_emb
    cls = (transformers.LlamaForCausalLM if name == "llama"
           else transformers.Qwen3ForCausalLM)
    model = cls(_hf_config(name, tiny)).to(device, dtype).train()
    ids = torch.randint(0, 1024, (batch, seq), generator=g).to(device)
    return model, (ids,), lambda out: out.logits.float().pow(2).mean()


@contextlib.contextmanager
def _restored_rope(name: str):
    """Undo Liger's patch of the modeling module after its alternative is built."""
    if name == "sglang":
        yield
        return
    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    original = module.apply_rotary_pos_emb
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = original


def make_step(model, inputs, loss_fn, alternative: str, mode: str, device: str) -> Callable:
    kwargs: dict = {}
    if alternative == "rope_compile":
        kwargs["backend"] = common.rope_backend()
        if torch.device(device).type == "cpu":
            kwargs["options"] = {"devices": ("cpu",)}
    if mode != "default" and "options" not in kwargs:
        kwargs["mode"] = mode
    forward = torch.compile(model, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_fn(forward(*inputs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return loss.detach()

    return step


def first_step_grads(model, inputs, loss_fn, alternative: str, device: str) -> list:
    """The gradients of one compiled step from the initial weights (no optimizer step)."""
    kwargs = {"backend": common.rope_backend()} if alternative == "rope_compile" else {}
    if alternative == "rope_compile" and torch.device(device).type == "cpu":
        kwargs["options"] = {"devices": ("cpu",)}
    loss_fn(torch.compile(model, **kwargs)(*inputs)).backward()
    grads = [p.grad.detach().float().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def rope_us(profile, alternative: str, inductor_profile, ours_profile) -> float | None:
    if profile is None:
        return None
    if alternative == "inductor":
        if ours_profile is None:
            return None
        return common.differing_kernels(inductor_profile.us_per_name,
                                        ours_profile.us_per_name)[0]
    return sum(us for name, us in profile.us_per_name.items() if ROPE_KERNEL.search(name))


def measure(name: str, args) -> dict:
    device, dtype = args.device, common.DTYPES[args.dtype]
    alternatives = [a for a in ALTERNATIVES if a in args.alternatives]
    if name == "sglang" or importlib.util.find_spec("liger_kernel") is None:
        alternatives = [a for a in alternatives if a != "liger"]
    row: dict = {"model": name, "alternatives": {}}
    steps: dict[str, dict[str, Callable]] = {mode: {} for mode in args.modes}
    grads = {}
    for alt in alternatives:
        with _restored_rope(name):
            model, inputs, loss_fn = build(name, alt, device, dtype, args.tiny, args.batch,
                                           args.seq)
            grads[alt] = first_step_grads(model, inputs, loss_fn, alt, device)
            for mode in args.modes:
                steps[mode][alt] = make_step(model, inputs, loss_fn, alt, mode, device)
                for _ in range(3):  # compile, and the first optimizer steps
                    steps[mode][alt]()
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            steps[args.modes[0]][alt]()
            common.synchronize(device)
            row["alternatives"].setdefault(alt, {})["peak_mib"] = (
                torch.cuda.max_memory_allocated() / 2**20)
    for alt in alternatives:
        entry = row["alternatives"].setdefault(alt, {})
        entry["max_grad_diff_vs_inductor"] = max(
            (a - b).abs().max().item() for a, b in zip(grads[alt], grads["inductor"],
                                                       strict=True))
    profiles = common.quietest_profiles(steps["default"], args.profile_steps, device)
    for mode in args.modes:
        for r in range(args.rounds):
            for alt in alternatives if r % 2 == 0 else alternatives[::-1]:
                ms = common.time_steps_ms(steps[mode][alt], args.iters, device, warmup=2)[0]
                row["alternatives"][alt].setdefault(f"ms_{mode}", []).append(ms)
    for alt in alternatives:
        entry, prof = row["alternatives"][alt], profiles.get(alt)
        if prof is not None:
            entry["kernels_per_step"] = prof.count
            entry["gpu_us_per_step"] = prof.gpu_us
            entry["rope_us_per_step"] = rope_us(prof, alt, profiles.get("inductor"),
                                                profiles.get("rope_compile"))
        for mode in args.modes:
            samples = entry[f"ms_{mode}"]
            entry[f"ms_{mode}_median"] = statistics.median(samples)
            entry[f"ms_{mode}_spread"] = [min(samples), max(samples)]
    return row


def table(rows: list[dict], modes) -> str:
    headers = ["model", "alternative", "kernels/step", "GPU µs/step", "RoPE µs/step",
               "peak MiB", *(f"ms/step {m} (min-max)" for m in modes), "max |Δgrad|"]
    cells = []
    for row in rows:
        for alt, e in row["alternatives"].items():
            cells.append([row["model"], alt, common.fmt(e.get("kernels_per_step")),
                          common.fmt(e.get("gpu_us_per_step")),
                          common.fmt(e.get("rope_us_per_step")), common.fmt(e.get("peak_mib")),
                          *(f"{e[f'ms_{m}_median']:.2f} ({e[f'ms_{m}_spread'][0]:.2f}-"
                            f"{e[f'ms_{m}_spread'][1]:.2f})" for m in modes),
                          f"{e['max_grad_diff_vs_inductor']:.2e}"])
    return common.markdown_table(headers, cells)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=common.default_device())
    parser.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--alternatives", default=",".join(ALTERNATIVES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small models and inputs")
    parser.add_argument("--json", help="write the rows and the environment here")
    args = parser.parse_args(argv)
    args.alternatives = args.alternatives.split(",")
    args.modes = ["default"] + (["reduce-overhead"]
                                if torch.device(args.device).type == "cuda" else [])
    if args.tiny:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 16)
        args.rounds, args.iters = min(args.rounds, 2), min(args.iters, 2)
    rows = [measure(name, args) for name in args.models.split(",")]
    print(table(rows, args.modes))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"env": common.env_info(args.device), "argv": sys.argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

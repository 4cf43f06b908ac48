"""Tensor parallel check (issue 12 item 5): a TP-sharded attention stack compiled with
``backend="rope_compile"`` gets its RoPE pairs fused on every rank, on local heads.

    torchrun --nproc-per-node 2 tests/tp_check.py                 # CUDA, nccl
    python tests/tp_check.py --spawn                               # the same, without torchrun
    python tests/tp_check.py --spawn --device cpu                  # CPU, gloo (debugging)

Models (``--model``, default both):

* ``sglang``: ``pass_helpers.AttnStack`` (one qkv projection, ``RotaryEmbedding.forward_native``,
  GQA attention, o projection). Its qkv weight rows are reordered into per-rank blocks
  ``[q_r | k_r | v_r]`` (as sglang's ``QKVParallelLinear`` lays them out), so ColwiseParallel's
  contiguous row shards give each rank its own q, k and v heads; each layer's head counts are
  set to the local ones.
* ``hf-llama``: HF ``LlamaForCausalLM``, q/k/v/gate/up ColwiseParallel, o/down RowwiseParallel
  (the HF table form of RoPE; its ``view(..., -1, head_dim)`` takes the local head count).

Sharding is ``torch.distributed.tensor.parallel.parallelize_module`` with the default
``use_local_output=True``: the projections return plain local tensors, so the compiled graph's
RoPE works on local shards with local head counts, and the o projection all-reduces. Each rank
compiles the sharded model with ``backend="rope_compile"`` (default options on CUDA;
``options={"devices": ("cpu",)}`` on the CPU), runs one forward and checks: the pass rewrote
at least one pair per layer (``counters["rope_compile"]["rewritten"]``), the generated code has
at least one fused call per layer, and the output equals the unsharded model's eager output
(built from the same seed on the rank's device) within the dtype's tolerance. Prints one line
per rank and model, ``PASS`` or ``FAIL``; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import traceback
from pathlib import Path

import torch

TESTS_DIR = Path(__file__).resolve().parent
for path in (TESTS_DIR, TESTS_DIR.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

MODELS = ("sglang", "hf-llama")
# Max abs error allowed, relative to max(1, max |eager output|): sharded matmuls add up in
# another order and the all-reduce rounds once more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4e-2}
HEADS, KV_HEADS, HEAD, HIDDEN = 4, 2, 128, 256


def _tp_qkv_order(hq: int, hk: int, d: int, world: int) -> torch.Tensor:
    """Row order that turns a ``[q | k | v]`` projection into ``[q_0 | k_0 | v_0 | q_1 ...]``."""
    q = torch.arange(hq * d).view(world, -1)
    k = torch.arange(hk * d).view(world, -1) + hq * d
    v = torch.arange(hk * d).view(world, -1) + (hq + hk) * d
    return torch.cat([q, k, v], dim=1).flatten()


def build_sglang(layers: int, dtype, device, mesh):
    from pass_helpers import AttnStack
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    full = AttnStack(num_layers=layers, hidden=HIDDEN, num_q_heads=HEADS,
                     num_kv_heads=KV_HEADS, head_size=HEAD, gqa="repeat", dtype=dtype).to(device)
    sharded = copy.deepcopy(full)
    world = mesh.size()
    order = _tp_qkv_order(HEADS, KV_HEADS, HEAD, world).to(device)
    for layer in sharded.layers:
        with torch.no_grad():
            layer.qkv.weight.copy_(layer.qkv.weight[order])
        layer.hq, layer.hk = HEADS // world, KV_HEADS // world
        parallelize_module(layer, mesh, {"qkv": ColwiseParallel(), "o": RowwiseParallel()})
    g = torch.Generator().manual_seed(1)
    tokens = 16
    args = (torch.randint(0, 512, (tokens,), generator=g).to(device),
            torch.randn(tokens, HIDDEN, generator=g).to(device=device, dtype=dtype))
    return full, sharded, args


def build_hf_llama(layers: int, dtype, device, mesh):
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=HIDDEN, intermediate_size=512,
                         num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, head_dim=HEAD,
                         max_position_embeddings=512, attn_implementation="sdpa",
                         use_cache=False)
    full = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    sharded = copy.deepcopy(full)
    plan = {}
    for i in range(layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(sharded, mesh, plan)
    g = torch.Generator().manual_seed(1)
    args = (torch.randint(0, 256, (2, 16), generator=g).to(device),)
    return full, sharded, args


BUILDERS = {"sglang": build_sglang, "hf-llama": build_hf_llama}


def _output(result) -> torch.Tensor:
    out = result.logits if hasattr(result, "logits") else result
    return out.float()


def check_model(name: str, layers: int, dtype, device, mesh, rank: int) -> bool:
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    from rope_compile.demo import count_fused_calls

    torch._dynamo.reset()
    counters.clear()
    try:
        full, sharded, args = BUILDERS[name](layers, dtype, device, mesh)
        options = {"devices": ("cpu",)} if device.type == "cpu" else None
        compiled = torch.compile(sharded, backend="rope_compile", options=options)
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            want = _output(full(*args))
            got, code = run_and_get_code(compiled, *args)
        got = _output(got)
        rewritten = int(counters["rope_compile"].get("rewritten", 0))
        fused = sum(count_fused_calls(c) for c in code)
        err = (got - want).abs().max().item()
        tol = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
        problems = []
        if rewritten < layers:
            problems.append(f"rewritten {rewritten} < {layers} layers")
        if fused < layers:
            problems.append(f"fused calls {fused} < {layers} layers")
        if not err <= tol:
            problems.append(f"max abs err {err:.3g} > {tol:.3g}")
        skipped = {k: v for k, v in counters["rope_compile"].items() if k.startswith("skipped")}
        detail = (f"rewritten={rewritten} fused_calls={fused} max_err={err:.3g} tol={tol:.3g}"
                  + (f" skipped={skipped}" if skipped else ""))
    except Exception as err:  # noqa: BLE001 - a failure of this rank, reported as such
        traceback.print_exc()
        problems, detail = [f"{type(err).__name__}: {err}".splitlines()[0][:300]], ""
    verdict = "PASS" if not problems else "FAIL (" + "; ".join(problems) + ")"
    print(f"tp_check rank {rank}/{mesh.size()} {name} {device.type} "
          f"{str(dtype).removeprefix('torch.')}: {verdict} {detail}", flush=True)
    return not problems


def run_rank(args: argparse.Namespace) -> bool:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU op needs no GPU
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        mesh = init_device_mesh(device.type, (world,))
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        ok = True
        for name in args.model.split(","):
            ok &= check_model(name.strip(), args.layers, dtype, device, mesh, rank)
        return ok
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not run_rank(args):
        sys.exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda with nccl (default when available), cpu with gloo")
    p.add_argument("--model", default=",".join(MODELS), help=f"comma-separated of {MODELS}")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="bf16 on CUDA, fp32 on CPU by default")
    p.add_argument("--spawn", action="store_true",
                   help="start --nproc processes with torch.multiprocessing (no torchrun)")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    bad = [m for m in args.model.split(",") if m.strip() not in MODELS]
    if bad:
        p.error(f"--model: unknown {bad}; choose from {MODELS}")
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.spawn:
        import torch.multiprocessing as mp

        if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
            print(f"tp_check: needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
            return 2
        try:
            mp.spawn(_spawned, args=(args.nproc, _free_port(), args), nprocs=args.nproc)
        except Exception as err:  # noqa: BLE001 - a rank failed (its line says why)
            print(f"tp_check: FAIL ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
            return 1
        return 0
    return 0 if run_rank(args) else 1


if __name__ == "__main__":
    sys.exit(main())

"""GLM-4.7-Flash MoE: the fast block (:mod:`inference_pio_glm_4_7_flash.moe`) against transformers' block.

    python benchmarks/bench_moe.py                      # CPU: block at tiny/mid/full layer sizes, decode tiny/mid
    python benchmarks/bench_moe.py --device cuda --dtype bfloat16 --sizes full --tokens 1,16,64,512 --compile

Block: one MoE block (router, routed experts, shared expert) on random weights of a size preset, fed
``T`` tokens; each of transformers' block (``grouped_mm``, the experts implementation ``from_pretrained``
picks on CPU and on the H100 alike), the fast block's
``gather`` and ``grouped`` paths and its ``auto`` choice runs on the same module object (the class is
swapped in between), interleaved step by step so that load from other processes hits all alike; the
median of ``--reps`` calls is reported, and the ratio transformers / ours. ``full`` is one layer of the
published shapes (hidden 2048, 64 experts of 1536, 4 per token, one shared expert).

Decode: the runtime's ``DecodeEngine`` over a whole model of a size preset (absorbed MLA in both), with
``moe_fast`` on and off on the same weights: median seconds per decode step of every slot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import inference_pio` does; torch must not load first

import torch

from inference_pio.runtime.contract import Prompt
from inference_pio.runtime.engine import DecodeEngine
from inference_pio_glm_4_7_flash.mla import install_absorbed_mla
from inference_pio_glm_4_7_flash.moe import FastMoE, install_fast_moe

SIZES: dict[str, dict[str, int]] = {
    # hidden, moe intermediate, routed experts, experts per token; decode models also take layers/heads/vocab
    "tiny": dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2),
    "mid": dict(hidden_size=512, moe_intermediate_size=384, n_routed_experts=32, num_experts_per_tok=4),
    "full": dict(hidden_size=2048, moe_intermediate_size=1536, n_routed_experts=64, num_experts_per_tok=4),
}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"
    )


def config_for(size: str, layers: int, vocab: int) -> Any:
    from transformers import Glm4MoeLiteConfig

    shape = SIZES[size]
    hidden = shape["hidden_size"]
    heads = max(1, hidden // 128)
    return Glm4MoeLiteConfig(
        **shape,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_shared_experts=1,
        kv_lora_rank=min(512, hidden // 2),
        q_lora_rank=min(768, hidden),
        qk_rope_head_dim=16 if hidden < 512 else 64,
        qk_nope_head_dim=32 if hidden < 512 else 128,
        v_head_dim=32 if hidden < 512 else 128,
        vocab_size=vocab,
        initializer_range=0.02,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_mode(block: torch.nn.Module, mode: str) -> None:
    """Put ``block`` into ``mode``: transformers, or the fast block on a path (gather/grouped/auto)."""
    if mode == "transformers":
        block.__class__ = FastMoE.__mro__[1]
    else:
        block.__class__ = FastMoE
        block.moe_path = mode


def block_times(
    size: str,
    tokens: list[int],
    modes: list[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    compile: bool,
) -> dict[int, dict[str, float]]:
    """Median seconds of one MoE block call per token count and mode."""
    from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteMoE

    config = config_for(size, 2, 256)
    config._experts_implementation = "grouped_mm"  # what from_pretrained picks; a bare block would loop
    torch.manual_seed(0)
    with device:
        block = Glm4MoeLiteMoE(config).to(dtype)
        for name in ("gate_up_proj", "down_proj"):
            getattr(block.experts, name).data.normal_(0, 0.02)
        block.gate.weight.data.normal_(0, 0.02)
        block.gate.e_score_correction_bias.data.normal_(0, 0.01)
    block.eval()
    wrapper = torch.nn.Sequential(block)
    install_fast_moe(wrapper)
    out: dict[int, dict[str, float]] = {}
    for count in tokens:
        x = torch.randn(count, 1, config.hidden_size, device=device, dtype=dtype)
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        # Eager: the modes alternate call by call. Compiled: one graph per mode, measured one after the other.
        for group in [[mode] for mode in modes] if compile else [modes]:
            call: Callable[..., Any] = block
            if compile:
                set_mode(block, group[0])
                torch._dynamo.reset()
                call = torch.compile(block, fullgraph=group[0] != "transformers")
            for rep in range(reps + 1):
                for mode in group:
                    set_mode(block, mode)
                    sync(device)
                    start = time.perf_counter()
                    with torch.inference_mode():
                        call(x)
                    sync(device)
                    if rep:
                        times[mode].append(time.perf_counter() - start)
        out[count] = {mode: statistics.median(t) for mode, t in times.items()}
    torch._dynamo.reset()
    return out


def decode_times(
    size: str, slots: int, *, device: torch.device, dtype: torch.dtype, layers: int, reps: int, compile: bool
) -> dict[str, float]:
    """Median seconds of one decode step of ``slots`` slots, transformers' MoE vs the fast MoE, same weights.

    Two copies of one model (absorbed MLA in both), one engine each, their steps alternating so that load
    from other processes hits both alike.
    """
    import copy

    from transformers import Glm4MoeLiteForCausalLM

    torch.manual_seed(0)
    with device:
        model = Glm4MoeLiteForCausalLM._from_config(config_for(size, layers, 4096), dtype=dtype)
    model.eval()
    install_absorbed_mla(model)
    fast = copy.deepcopy(model)
    install_fast_moe(fast)
    engines = {}
    for mode, m in (("transformers", model), ("fast", fast)):
        engine = engines[mode] = DecodeEngine(m, max_len=256, max_slots=slots, compile=compile)
        engine.warm_up()
        for slot in range(slots):
            engine.prefill(slot, Prompt(list(range(1, 33))))
    steps: dict[str, list[float]] = {mode: [] for mode in engines}
    for rep in range(reps + 1):
        for mode, engine in engines.items():
            if engine.lengths[0] >= 250:  # stay inside one view bucket
                engine.lengths = [32] * slots
                with torch.inference_mode():
                    engine.positions.fill_(32)
            sync(device)
            start = time.perf_counter()
            engine.decode_step(list(range(slots)))
            sync(device)
            if rep:
                steps[mode].append(time.perf_counter() - start)
    for engine in engines.values():
        engine.release()
    torch._dynamo.reset()
    return {mode: statistics.median(t) for mode, t in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: float32 on CPU, else bf16")
    ap.add_argument("--sizes", default="tiny,mid,full", help="block sizes (full: one published-size layer)")
    ap.add_argument("--tokens", default="1,2,4,8,16,64,256")
    ap.add_argument("--decode-sizes", default="tiny,mid")
    ap.add_argument("--slots", default="1,8")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="compile block and decode step (CUDA graphs on CUDA)")
    ap.add_argument("--json")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    tokens = [int(t) for t in args.tokens.split(",") if t]
    modes = ["transformers", "gather", "grouped", "auto"]
    report: dict[str, Any] = {"machine": machine(args.device), "dtype": str(dtype), "compile": args.compile}
    print(f"{report['machine']}; {dtype}; compile {'on' if args.compile else 'off'}; median of {args.reps}")
    for size in [s for s in args.sizes.split(",") if s]:
        results = block_times(size, tokens, modes, device=device, dtype=dtype, reps=args.reps, compile=args.compile)
        report[f"block_{size}"] = results
        print(f"\nMoE block, {size} {SIZES[size]}: ms per call")
        print("| tokens | transformers | gather | grouped | auto | transformers / auto |")
        print("|---|---|---|---|---|---|")
        for count, row in results.items():
            cells = " | ".join(f"{row[m] * 1e3:.3f}" for m in modes)
            print(f"| {count} | {cells} | {row['transformers'] / row['auto']:.2f}x |")
    for size in [s for s in args.decode_sizes.split(",") if s]:
        for slots in [int(s) for s in args.slots.split(",") if s]:
            result = decode_times(
                size, slots, device=device, dtype=dtype, layers=args.layers, reps=args.reps, compile=args.compile
            )
            report[f"decode_{size}_{slots}"] = result
            ratio = result["transformers"] / result["fast"]
            print(
                f"decode {size}, {args.layers} layers, {slots} slot(s): transformers "
                f"{result['transformers'] * 1e3:.2f} ms/step, fast MoE {result['fast'] * 1e3:.2f} ms/step "
                f"({ratio:.2f}x)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

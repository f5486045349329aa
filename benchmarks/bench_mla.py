"""GLM-4.7-Flash decode step time against context length: absorbed MLA vs transformers' expanded MLA.

    python benchmarks/bench_mla.py                                  # CPU, float32, 4 layers, 128 / 1k / 8k context
    python benchmarks/bench_mla.py --device cuda --dtype bfloat16 --compile --layers 47 --experts 64
    python benchmarks/bench_mla.py --slots-table                    # 8k-context slots per GPU size (no model built)

The model is GLM-4.7-Flash's real attention and hidden sizes (20 heads, kv_lora_rank 512, rope 64,
nope 192, v 256, hidden 2048) with fewer layers and experts and a smaller vocabulary so that it fits a
CPU; random weights. Both modes run the runtime's ``DecodeEngine`` (static slot cache, 4-D mask over
a bucketed view) on the same model object, switched with ``install_absorbed_mla`` /
``uninstall_absorbed_mla``. The cache is filled with random latents up to the context length instead
of a prefill (a decode step's cost depends on how many positions it reads, not on their values), then
each step decodes at position ``context - 1`` of every slot; the median of ``--reps`` steps is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import inference_pio` does; torch must not load first

import torch

from inference_pio.runtime.contract import Prompt
from inference_pio.runtime.engine import DecodeEngine
from inference_pio_glm_4_7_flash.metadata import METADATA
from inference_pio_glm_4_7_flash.mla import install_absorbed_mla, latent_cache_bytes_per_token, uninstall_absorbed_mla
from inference_pio_glm_4_7_flash.testing import full_size_config

GIB = 2**30


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"
    )


def bench_config(layers: int, experts: int, vocab: int) -> Any:
    """GLM-4.7-Flash's attention and hidden sizes, ``layers`` layers (the first dense, as published)."""
    full: Any = full_size_config()
    from transformers import Glm4MoeLiteConfig

    return Glm4MoeLiteConfig(
        hidden_size=full.hidden_size,
        intermediate_size=full.intermediate_size,
        moe_intermediate_size=full.moe_intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=full.num_attention_heads,
        num_key_value_heads=full.num_key_value_heads,
        n_routed_experts=experts,
        num_experts_per_tok=min(full.num_experts_per_tok, experts),
        n_shared_experts=full.n_shared_experts,
        kv_lora_rank=full.kv_lora_rank,
        q_lora_rank=full.q_lora_rank,
        qk_rope_head_dim=full.qk_rope_head_dim,
        qk_nope_head_dim=full.qk_nope_head_dim,
        v_head_dim=full.v_head_dim,
        rope_interleave=full.rope_interleave,
        vocab_size=vocab,
        max_position_embeddings=full.max_position_embeddings,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MODES = {"expanded": uninstall_absorbed_mla, "absorbed": install_absorbed_mla}


def step_times(
    model: Any, contexts: list[int], modes: list[str], *, slots: int, compile: bool, reps: int
) -> dict[str, dict[int, float]]:
    """Median seconds of one decode step (all ``slots`` at ``context - 1``) per mode and context.

    Eager runs alternate the modes step by step on one engine, so load from other processes hits both
    alike; compiled runs need one engine (one graph) per mode and measure the modes one after the other.
    """
    engine = None
    out: dict[str, dict[int, float]] = {mode: {} for mode in modes}
    for group in [modes] if not compile else [[mode] for mode in modes]:
        MODES[group[0]](model)
        engine = DecodeEngine(model, max_len=max(contexts), max_slots=slots, compile=compile)
        engine.warm_up()
        for slot in range(slots):
            engine.prefill(slot, Prompt([1, 2, 3, 4]))  # allocates the cache
        generator = torch.Generator(engine.device).manual_seed(0)
        with torch.inference_mode():
            for layer in engine.cache.layers:
                layer.keys.normal_(generator=generator)
                layer.values.normal_(generator=generator)
        active = list(range(slots))
        for context in contexts:
            times: dict[str, list[float]] = {mode: [] for mode in group}
            for rep in range(reps + 1):  # the first step of each context is a warm-up
                for mode in group:
                    MODES[mode](model)
                    with torch.inference_mode():
                        engine.positions.fill_(context - 1)
                    engine.lengths = [context - 1] * slots
                    sync(engine.device)
                    start = time.perf_counter()
                    engine.decode_step(active)
                    sync(engine.device)
                    if rep:
                        times[mode].append(time.perf_counter() - start)
            for mode in group:
                out[mode][context] = statistics.median(times[mode])
        engine.release()
        torch._dynamo.reset()
    return out


def slots_table(gpus_gib: list[int], context: int, reserve_gib: float) -> list[dict[str, Any]]:
    """Concurrent ``context``-token slots that fit beside the full-size weights (bf16 cache in every case)."""
    config: Any = full_size_config()
    per_slot = latent_cache_bytes_per_token(config, 2) * (context + 1)  # the slot cache keeps one spare position
    heads = int(config.num_attention_heads)
    expanded_per_token = (
        int(config.num_hidden_layers)
        * heads
        * (int(config.qk_nope_head_dim) + int(config.qk_rope_head_dim) + int(config.v_head_dim))
        * 2
    )
    weights = {"bf16": METADATA.memory_requirements["bfloat16"], "int4": METADATA.memory_requirements["int4"]}
    rows = []
    for gib in gpus_gib:
        free = gib * GIB - reserve_gib * GIB
        row: dict[str, Any] = {"gpu_gib": gib}
        for name, size in weights.items():
            row[name] = max(0, int((free - size) // per_slot))
            row[f"{name}_if_expanded_kv_cached"] = max(0, int((free - size) // (expanded_per_token * (context + 1))))
        rows.append(row)
    return [{"per_slot_bytes": per_slot, "weights": weights, "reserve_gib": reserve_gib}, *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: float32 on CPU, else bf16")
    ap.add_argument("--contexts", default="128,1024,8192")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="compile the step (CUDA graphs on CUDA)")
    ap.add_argument("--slots-table", action="store_true", help="only print the slots-per-GPU table")
    ap.add_argument("--reserve-gib", type=float, default=2.0, help="GPU memory kept for activations and context")
    ap.add_argument("--json")
    args = ap.parse_args()

    if args.slots_table:
        head, *rows = slots_table([24, 48, 80], 8192, args.reserve_gib)
        bf16, int4 = head["weights"]["bf16"] / 1e9, head["weights"]["int4"] / 1e9
        print(
            f"8k-context slots, full-size GLM-4.7-Flash: {head['per_slot_bytes'] / 1e6:.1f} MB of bf16 latent "
            f"cache per slot; weights {bf16:.1f} GB (bf16), {int4:.1f} GB (int4 plan); {args.reserve_gib} GiB reserved"
        )
        print("| GPU | bf16 weights | int4 weights | bf16, if expanded K/V were cached | int4, same |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['gpu_gib']} GiB | {row['bf16']} | {row['int4']} | "
                f"{row['bf16_if_expanded_kv_cached']} | {row['int4_if_expanded_kv_cached']} |"
            )
        return

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    contexts = [int(c) for c in args.contexts.split(",")]
    from transformers import Glm4MoeLiteForCausalLM

    torch.manual_seed(0)
    with device:
        model = Glm4MoeLiteForCausalLM._from_config(bench_config(args.layers, args.experts, args.vocab), dtype=dtype)
    model.eval()
    results = step_times(model, contexts, list(MODES), slots=args.slots, compile=args.compile, reps=args.reps)

    print(
        f"{machine(args.device)}; {dtype}; {args.layers} layers, {args.experts} experts, vocab {args.vocab}; "
        f"{args.slots} slot(s); compile {'on' if args.compile else 'off'}; median of {args.reps} steps"
    )
    print("| context | expanded (transformers) ms/step | absorbed ms/step | speed-up |")
    print("|---|---|---|---|")
    for context in contexts:
        exp, absb = results["expanded"][context], results["absorbed"][context]
        print(f"| {context} | {exp * 1e3:.1f} | {absb * 1e3:.1f} | {exp / absb:.2f}x |")
    base = results["absorbed"][contexts[0]]
    print(
        "absorbed step at the longest context vs the shortest: "
        f"{results['absorbed'][contexts[-1]] / base:.2f}x (expanded: "
        f"{results['expanded'][contexts[-1]] / results['expanded'][contexts[0]]:.2f}x)"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine(args.device), "args": vars(args), "seconds": results}, fh, indent=2)


if __name__ == "__main__":
    main()

"""GLM-4.7-Flash int8/int4: fidelity, weight bytes, load peak and decode speed, ours against transformers' bitsandbytes.

    python benchmarks/bench_quant.py                        # CPU, the tiny test checkpoint
    python benchmarks/bench_quant.py --size mid             # GLM's real hidden/expert sizes, 3 layers, 8 experts
    python benchmarks/bench_quant.py --size mid --device cuda --dtype bfloat16 --layers 8 --experts 64

"Ours" is the plugin's quantized load (bitsandbytes for the linear layers, :mod:`quant` for the routed experts,
streamed from the checkpoint); "ours, experts only" quantizes the routed experts alone (their share of the
error). "transformers bnb" is ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` alone, which
leaves the fused experts in full precision (and, on the CPU, fails for int8: kv_b_proj's 4-D input).

Per mode: top-1 agreement with the float model at every position of ``--prompts`` random sequences of
``--length`` tokens (teacher-forced, one forward each), the mean relative logit error, the measured bytes of
the loaded weights beside the plugin's memory plan figure (the plan is for "ours"), the load's peak (CUDA:
``max_memory_allocated``; CPU: the process's anonymous resident memory, sampled) above what was there before,
and decode tokens/s at batch 1 through the runtime (the same ``DecodeEngine`` for every mode; compiled on
CUDA). Random weights: top-1 agreement of a random model is a lower bound (its logits are closer together
than a trained model's).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import inference_pio` does; torch must not load first

import torch

from inference_pio.common.memory import MemoryPlan, checkpoint_parameter_count
from inference_pio.runtime.hf_plugin import from_pretrained_kwargs
from inference_pio_glm_4_7_flash import Glm47FlashPlugin, mla, moe, quant
from inference_pio_glm_4_7_flash.testing import full_size_config, make_tiny_checkpoint

GB = 1e9


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    name = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def make_mid_checkpoint(directory: pathlib.Path, layers: int, experts: int, vocab: int, dtype: torch.dtype) -> None:
    """GLM-4.7-Flash's hidden, attention and expert sizes with ``layers`` layers (the first dense) and
    ``experts`` routed experts; random weights saved as a checkpoint (the published per-expert layout)."""
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    full: Any = full_size_config()
    values = {k: v for k, v in full.to_dict().items() if k in Glm4MoeLiteConfig().to_dict()}
    values.update(
        num_hidden_layers=layers,
        n_routed_experts=experts,
        num_experts_per_tok=min(int(full.num_experts_per_tok), experts),
        vocab_size=vocab,
        mlp_layer_types=["dense"] + ["sparse"] * (layers - 1),
        eos_token_id=[0],
        pad_token_id=0,
    )
    values.pop("architectures", None)
    torch.manual_seed(0)
    model = Glm4MoeLiteForCausalLM(Glm4MoeLiteConfig(**values)).to(dtype).eval()
    model.save_pretrained(directory)


def weight_bytes(model: Any) -> int:
    """Parameters and buffers, plus bitsandbytes' quantization state hanging off its parameters."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for value in state.as_dict(packed=True).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        scb = getattr(tensor, "SCB", None)
        if isinstance(scb, torch.Tensor) and id(scb) not in seen:
            seen.add(id(scb))
            total += scb.numel() * scb.element_size()
    return total


def anon_rss() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def load_peak(load: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """``load()`` and its peak memory above the level before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model = load()
        return model, torch.cuda.max_memory_allocated(device) - before
    before = peak = anon_rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, anon_rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        model = load()
    finally:
        done.set()
        sampler.join()
    return model, max(peak, anon_rss()) - before


def logits_of(model: Any, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for ids in batches:
            out.append(model(input_ids=ids.to(model.device)).logits.float().cpu())
    return out


def decode_tps(model: Any, device: torch.device, tokens: int, compile: bool) -> float:
    """Decode tokens/s at batch 1 through the runtime's engine (prefill excluded)."""
    from inference_pio.runtime.contract import Prompt
    from inference_pio.runtime.engine import DecodeEngine

    mla.install_absorbed_mla(model)  # the plugin's defaults (where a layer allows them)
    moe.install_fast_moe(model)
    engine = DecodeEngine(model, max_len=256, max_slots=1, compile=compile)
    engine.warm_up()
    engine.prefill(0, Prompt([1, 2, 3, 4, 5, 6, 7, 8]))
    for _ in range(3):
        engine.decode_step([0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(tokens):
        engine.decode_step([0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    engine.release()
    torch._dynamo.reset()
    return tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "mid"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: float32 on CPU, else bf16")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per mode")
    ap.add_argument("--schemes", default="int8,int4")
    ap.add_argument("--json")
    args = ap.parse_args()

    import transformers

    device = torch.device(args.device)
    dtype_name = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    dtype = getattr(torch, dtype_name)
    compile = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "ckpt"
        if args.size == "tiny":
            make_tiny_checkpoint(path)
        else:
            make_mid_checkpoint(path, args.layers, args.experts, args.vocab, dtype)
        config = transformers.AutoConfig.from_pretrained(path)
        count = checkpoint_parameter_count(path)
        sizes = Glm47FlashPlugin().weight_sizes(path)  # what the plugin's memory plan counts
        generator = torch.Generator().manual_seed(0)
        batches = [
            torch.randint(0, int(config.vocab_size), (1, args.length), generator=generator) for _ in range(args.prompts)
        ]

        def plain() -> Any:
            return transformers.Glm4MoeLiteForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device))

        reference, peak = load_peak(plain, device)
        ref_logits = logits_of(reference, batches)
        rows: list[dict[str, Any]] = [
            {
                "mode": f"{dtype_name} (transformers)",
                "top1": 1.0,
                "rel_err": 0.0,
                "bytes": weight_bytes(reference),
                "plan": sizes.bytes_for(dtype_name, "none"),
                "peak": peak,
                "tps": decode_tps(reference, device, args.tokens, compile),
            }
        ]
        del reference
        for scheme in args.schemes.split(","):
            plan = MemoryPlan(str(device), dtype_name, scheme, 0, 0, "benchmark")  # type: ignore[arg-type]
            for who in ("ours", "ours, experts only", "transformers bnb"):
                kwargs = from_pretrained_kwargs(plan, str(device), {})
                if who == "ours, experts only":  # the routed experts' own share of the error (no bitsandbytes)
                    kwargs.pop("quantization_config")

                def load(kwargs: dict[str, Any] = kwargs, who: str = who, scheme: str = scheme) -> Any:
                    if who.startswith("ours"):
                        return quant.load_quantized(str(path), kwargs, scheme)
                    return transformers.Glm4MoeLiteForCausalLM.from_pretrained(path, **kwargs)

                row: dict[str, Any] = {"mode": f"{scheme} {who}", "plan": sizes.bytes_for(dtype_name, scheme)}
                try:
                    model, row["peak"] = load_peak(load, device)
                    got = logits_of(model, batches)
                    row["bytes"] = weight_bytes(model)
                    row["top1"] = sum(
                        (a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(got, ref_logits)
                    ) / len(got)
                    row["rel_err"] = sum(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref_logits)) / len(got)
                    row["tps"] = decode_tps(model, device, args.tokens, compile)
                    del model
                except Exception as exc:  # a failing baseline is a result, reported as such
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                rows.append(row)
                gc.collect()

    full: Any = full_size_config()
    print(
        f"{machine(args.device)}; {dtype_name}; {args.size} checkpoint ({count / 1e6:.2f} M parameters, "
        f"{config.num_hidden_layers} layers, {config.n_routed_experts} experts); top-1 over {args.prompts} x "
        f"{args.length} positions; decode batch 1, {args.tokens} steps, compile {'on' if compile else 'off'}"
    )
    print("| mode | top-1 vs float | rel. logit error | weight bytes | plan's bytes | load peak | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['mode']} | failed: {row['error']} | | | | | |")
            continue
        print(
            f"| {row['mode']} | {row['top1']:.3f} | {row['rel_err']:.4f} | {row['bytes'] / 1e6:.2f} MB | "
            f"{row['plan'] / 1e6:.2f} MB | {row['peak'] / 1e6:.1f} MB | {row['tps']:.1f} |"
        )
    print(
        "Full-size GLM-4.7-Flash routed experts: "
        + ", ".join(f"{s} {quant.expert_bytes(full, s) / GB:.2f} GB" for s in ("int8", "int4"))
        + f" (bf16: {_bf16_experts(full) / GB:.2f} GB)"
    )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"machine": machine(args.device), "rows": rows}, indent=2))


def _bf16_experts(config: Any) -> int:
    sparse = sum(1 for kind in config.mlp_layer_types if kind == "sparse")
    return 2 * sparse * int(config.n_routed_experts) * 3 * int(config.moe_intermediate_size) * int(config.hidden_size)


if __name__ == "__main__":
    main()

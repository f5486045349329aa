"""Prefill and decode speed: the plugin's runtime against plain transformers `generate`, same weights, one run.

    python benchmarks/bench_generation.py --model qwen3_vl_2b --size tiny
    python benchmarks/bench_generation.py --model qwen3_vl_2b --size mid             # ~0.5 B random weights
    python benchmarks/bench_generation.py --model qwen3_vl_2b --size full            # 2.1 B random weights
    python benchmarks/bench_generation.py --model glm_4_7_flash --size full --device cuda   # needs ~60 GB GPU

Decode rate is n / (t(n+1 new tokens) - t(1 new token)), greedy, forced to a fixed length (EOS ignored),
for both sides. Prints a table with the machine, and --json FILE keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import inference_pio` does; torch must not load first

import torch

from inference_pio import GenerationParams
from inference_pio.runtime.contract import Prompt

PLUGINS = {
    "qwen3_vl_2b": ("inference_pio_qwen3_vl_2b", "create_qwen3_vl_2b_plugin"),
    "glm_4_7_flash": ("inference_pio_glm_4_7_flash", "create_glm_4_7_flash_plugin"),
}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mid_size_config(model_name: str) -> Any:
    """A ~0.5 B-parameter variant of the real architecture, for CPU measurements at a realistic size."""
    if model_name == "qwen3_vl_2b":
        from inference_pio_qwen3_vl_2b.testing import PUBLISHED_IDS, qwen3_vl_config

        text = dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=151936,
            max_position_embeddings=8192,
        )
        vision = dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=1024)
        return qwen3_vl_config(text=text, vision=vision, mrope_section=[8, 12, 12], token_ids=PUBLISHED_IDS)
    from transformers import Glm4MoeLiteConfig

    return Glm4MoeLiteConfig(
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=384,
        num_hidden_layers=12,
        num_attention_heads=16,
        n_routed_experts=32,
        num_experts_per_tok=4,
        kv_lora_rank=256,
        q_lora_rank=384,
        qk_rope_head_dim=32,
        v_head_dim=64,
        qk_nope_head_dim=64,
        vocab_size=151552,
    )


def build(model_name: str, size: str, device: str, dtype: torch.dtype, compile: bool | None) -> Any:
    import importlib

    module_name, factory = PLUGINS[model_name]
    module = importlib.import_module(module_name)
    testing = importlib.import_module(f"{module_name}.testing")
    plugin = getattr(module, factory)()
    if size == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            path = testing.make_tiny_checkpoint(tmp)
            plugin.initialize()
            plugin.load_model(
                {
                    "device": device,
                    "model_path": str(path),
                    "dtype": "auto",
                    "quantization": "none",
                    "max_context": 1024,
                    "compile": compile,
                }
            )
        return plugin
    import transformers

    config = testing.full_size_config() if size == "full" else mid_size_config(model_name)
    cls = getattr(transformers, plugin.MODEL_CLASS)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype).eval()
    plugin.use_model(model, max_context=1024, compile=compile)
    return plugin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(PLUGINS), default="qwen3_vl_2b")
    ap.add_argument("--size", choices=["tiny", "mid", "full"], default="tiny", help="mid: ~0.5 B parameters")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA only")
    ap.add_argument("--json")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    compile = {"auto": None, "on": True, "off": False}[args.compile]
    plugin = build(args.model, args.size, args.device, dtype, compile)
    engine, model = plugin.engine, plugin.model
    vocab = engine.vocab_size
    ids = torch.randint(
        min(100, vocab // 4), vocab - min(300, vocab // 4), (args.prompt,), generator=torch.Generator().manual_seed(0)
    ).tolist()

    def ours(n: int) -> None:
        for _ in plugin.scheduler.submit(Prompt(list(ids)), GenerationParams(max_new_tokens=n, ignore_eos=True)):
            pass

    def theirs(n: int) -> None:
        x = torch.tensor([ids], device=args.device)
        with torch.inference_mode():
            model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

    rows = {}
    for name, fn in (("inference-pio", ours), ("transformers generate", theirs)):
        fn(2)  # warm-up
        t1 = timed(lambda fn=fn: fn(1), args.device, args.reps)
        tn = timed(lambda fn=fn: fn(args.new + 1), args.device, args.reps)
        rows[name] = {"prefill_ms": t1 * 1e3, "decode_tok_s": args.new / (tn - t1)}
    ratio = rows["inference-pio"]["decode_tok_s"] / rows["transformers generate"]["decode_tok_s"]
    result = {
        "model": args.model,
        "size": args.size,
        "device": args.device,
        "dtype": str(dtype),
        "machine": machine(args.device),
        "compiled": engine.compile,
        "warm_up_s": engine.compiled_at,
        "prompt": args.prompt,
        "new": args.new,
        "rows": rows,
        "decode_ratio": ratio,
    }
    mode = f"compiled decode step (warm-up {engine.compiled_at:.1f} s)" if engine.compile else "eager decode step"
    print(f"{args.model} ({args.size}, {dtype}) on {result['machine']}; prompt {args.prompt}, new {args.new}; {mode}")
    for name, row in rows.items():
        print(f"  {name:<22} prefill {row['prefill_ms']:8.1f} ms   decode {row['decode_tok_s']:8.1f} tok/s")
    print(f"  decode ratio inference-pio / transformers: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()

"""Qwen3-VL image time-to-first-token: the plugin's fast vision path against plain transformers, same weights.

    python benchmarks/bench_vision.py                       # CPU, float32: tiny and mid size
    python benchmarks/bench_vision.py --size full --reps 2  # the published architecture (random weights)
    python benchmarks/bench_vision.py --device cuda --dtype bfloat16 --size full

Requests: one 896x896 image + 32 text tokens, and four such images + the same text. Measured per request,
end to end, median of ``--reps`` after one warm-up, the contenders' calls interleaved:

- ``ours``: ``plugin.chat_completion(..., max_new_tokens=1)`` with ``vision_fast`` on (preprocessing on the
  device, the batched tower, DeepStack added in place) — template, image planning, prefill, first token;
- ``ours, vision_fast off``: the same runtime with transformers' processor and tower;
- ``transformers``: the image processor and tokenizer, then ``model.generate(max_new_tokens=1)``.

Also timed alone: preprocessing (ours vs the processor) and the vision tower (ours vs ``Qwen3VLVisionModel``
on the processor's pixel values). The image processor has the published checkpoint's settings (16-px
patches, 2x2 merge, up to 16 Mpx, mean/std 0.5), so 896x896 is 56x56 patches, 784 image tokens. Sizes:
``tiny`` is the test checkpoint (2+2 layers, width 64); ``mid`` has the published vision width (1024, 16
heads) with 2 of its 24 blocks and a 1024-wide 4-layer language model (what a 2-core CPU runs in seconds);
``full`` is the published architecture. Weights are random; the tokenizer is the tiny checkpoint's.
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
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import inference_pio` does; torch must not load first

import numpy as np
import torch
from PIL import Image

from inference_pio_qwen3_vl_2b import Qwen3VL2BPlugin
from inference_pio_qwen3_vl_2b.testing import full_size_config, make_tiny_checkpoint, qwen3_vl_config
from inference_pio_qwen3_vl_2b.vision import FastVision

TEXT_TOKENS = 32
SIDE = 896


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def race(fns: dict[str, Callable[[], Any]], device: str, reps: int) -> dict[str, float]:
    """Median seconds per call of each of ``fns`` after one warm-up each, the calls interleaved (round after
    round, the order rotating) so that a machine whose load changes slows every contender alike."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        fns[name]()
    sync(device)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def published_processor(path: Path) -> None:
    """Give the checkpoint at ``path`` the published Qwen3-VL-2B image processor settings."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": 65_536, "longest_edge": 16_777_216},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(path)


def config_for(size: str, token_ids: dict[str, int]) -> Any:
    full = full_size_config()
    if size == "full":
        for key, value in token_ids.items():  # the tiny tokenizer's placeholder ids
            setattr(full, key, value)
        return full
    text = dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=151_936,
        max_position_embeddings=8192,
    )
    vision = dict(
        depth=2,
        hidden_size=1024,
        intermediate_size=4096,
        num_heads=16,
        out_hidden_size=1024,
        deepstack_visual_indexes=[0, 1],
    )
    return qwen3_vl_config(text=text, vision=vision, mrope_section=[8, 12, 12], token_ids=token_ids)


def build(size: str, device: str, dtype: torch.dtype, path: Path, vision_fast: bool, model: Any = None) -> Any:
    plugin = Qwen3VL2BPlugin()
    plugin.initialize(vision_fast=vision_fast, max_images=4)
    plugin.load_processor(str(path), {})
    if model is None:
        import transformers

        if size == "tiny":
            config = transformers.AutoConfig.from_pretrained(path)
            config.text_config.max_position_embeddings = 8192  # four 896x896 images are 3,136 tokens
            cls = transformers.Qwen3VLForConditionalGeneration
            model = cls.from_pretrained(path, config=config, dtype=dtype).to(device)
        else:
            vocab = plugin.tokenizer.get_vocab()
            ids = {
                "image_token_id": vocab["<|image_pad|>"],
                "video_token_id": vocab["<|video_pad|>"],
                "vision_start_token_id": vocab["<|vision_start|>"],
                "vision_end_token_id": vocab["<|vision_end|>"],
            }
            with torch.device(device):
                model = transformers.Qwen3VLForConditionalGeneration._from_config(
                    config_for(size, ids), dtype=dtype
                ).eval()
        model.eval()
    plugin.use_model(model, max_context=4096, compile=False)
    return plugin


def request_text(plugin: Any) -> str:
    words: list[str] = []
    while len(plugin.tokenize(" ".join(words))) < TEXT_TOKENS:
        words.append(["describe", "the", "picture", "in", "detail", "please"][len(words) % 6])
    return " ".join(words)


def transformers_request(plugin: Any, path: Path, images: list[Any], text: str) -> Callable[[], Any]:
    """Plain transformers: processor + tokenizer, then ``generate(max_new_tokens=1)``."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoImageProcessor.from_pretrained(path)
    model = plugin.model
    device = next(model.parameters()).device
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def run() -> Any:
        content = [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        inputs = dict(processor(images=images, return_tensors="pt"))
        for grid in inputs["image_grid_thw"]:
            prompt = prompt.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
        ids = torch.tensor([tokenizer(prompt.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"]])
        inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == pad_id).int())
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=1, do_sample=False)

    return run


def measure(
    fast: Any, slow: Any, path: Path, images: list[Any], text: str, device: str, dtype: torch.dtype, reps: int
) -> dict[str, Any]:
    """One request shape, every way (seconds)."""
    content = [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]

    def ask(plugin: Any) -> Any:
        return plugin.chat_completion(messages, max_new_tokens=1, temperature=0)

    row: dict[str, Any] = {"images": len(images), "prompt_tokens": ask(fast).usage.prompt_tokens}
    ttft = race(
        {
            "ours_s": lambda: ask(fast),
            "ours_vision_fast_off_s": lambda: ask(slow),
            "transformers_s": transformers_request(fast, path, images, text),
        },
        device,
        reps,
    )
    # the parts alone
    pre = fast.vision_path.preprocessor
    target = torch.device(device)

    def preprocess() -> Any:
        prepared = [pre.prepare(im, on_host=target.type == "cpu", pin=target.type == "cuda") for im in images]
        return pre.patches(prepared, target, dtype)

    processor = fast.image_processor
    parts = race(
        {
            "preprocess_ours_s": preprocess,
            "preprocess_processor_s": lambda: processor(images=images, return_tensors="pt"),
        },
        device,
        reps,
    )
    inputs = processor(images=images, return_tensors="pt")
    pixels = inputs["pixel_values"].to(target, dtype)
    grid = inputs["image_grid_thw"].to(target)
    visual = fast.model.model.visual
    tower = FastVision(visual)
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    frames = preprocess()
    with torch.inference_mode():
        towers = race(
            {
                "tower_ours_s": lambda: tower(frames, grids),
                "tower_transformers_s": lambda: visual(pixels, grid_thw=grid),
            },
            device,
            reps,
        )
    row.update(ttft, **parts, **towers)
    row["ttft_ratio"] = row["transformers_s"] / row["ours_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "mid", "full"], action="append", help="default: tiny and mid")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, else bf16")
    ap.add_argument("--images", type=int, choices=[1, 2, 3, 4], action="append", help="default: 1 and 4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    rows: list[dict[str, Any]] = []
    print(f"machine: {machine(args.device)}, {dtype}")
    rng = np.random.RandomState(0)
    pictures = [Image.fromarray((rng.rand(SIDE, SIDE, 3) * 255).astype("uint8")) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "tiny")
        published_processor(path)
        for size in args.size or ["tiny", "mid"]:
            fast = build(size, args.device, dtype, path, True)
            slow = build(size, args.device, dtype, path, False, model=fast.model)
            text = request_text(fast)
            for count in args.images or [1, 4]:
                row = {"size": size, **measure(fast, slow, path, pictures[:count], text, args.device, dtype, args.reps)}
                rows.append(row)
                print(
                    f"{size:>4} {count} image(s), {row['prompt_tokens']} prompt tokens: TTFT ours "
                    f"{row['ours_s'] * 1e3:.1f} ms, vision_fast off {row['ours_vision_fast_off_s'] * 1e3:.1f} ms, "
                    f"transformers {row['transformers_s'] * 1e3:.1f} ms (x{row['ttft_ratio']:.2f}); preprocess "
                    f"{row['preprocess_ours_s'] * 1e3:.1f} vs {row['preprocess_processor_s'] * 1e3:.1f} ms; tower "
                    f"{row['tower_ours_s'] * 1e3:.1f} vs {row['tower_transformers_s'] * 1e3:.1f} ms",
                    flush=True,
                )
            fast.cleanup()
            slow.cleanup()
    if args.json:
        result = {"machine": machine(args.device), "dtype": str(dtype), "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""The fast vision path (``vision_fast``) against transformers on the tiny checkpoint, float32 on CPU: the
preprocessing against the checkpoint's image processor, the tower against ``Qwen3VLVisionModel``, and 64
greedy tokens against ``generate`` with one image and with several of different sizes, eager and compiled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig

from inference_pio import PluginManager
from inference_pio.runtime.images import image_to_tensor, resize_like_pil
from inference_pio_qwen3_vl_2b import Qwen3VL2BPlugin, vision
from inference_pio_qwen3_vl_2b.vision import FastVision, ImageEncoding, Preprocessor, attention_kind

STEPS = 64


def noise(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def smooth(size: tuple[int, int]) -> Image.Image:
    """A photo-like image: gradients, a flat patch with sharp edges, slightly blurred."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([128 + 100 * np.sin(x / 37 + y / 53), 128 + 90 * np.cos(x / 23 - y / 41), (x * y) % 256], -1)
    rgb[h // 3 : h // 2, w // 4 : w // 2] = [250, 20, 30]
    return Image.fromarray(rgb.clip(0, 255).astype("uint8")).filter(ImageFilter.GaussianBlur(1.5))


def pil_resize(image: Image.Image, size: tuple[int, int], resample: str) -> torch.Tensor:
    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    return torch.from_numpy(np.array(image.resize((size[1], size[0]), filters[resample]))).permute(2, 0, 1)


# -- preprocessing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("source", "target"),
    [((70, 90), (70, 128)), ((70, 90), (70, 31)), ((70, 90), (200, 90)), ((301, 64), (96, 64)), ((5, 3), (5, 17))],
)
def test_resize_like_pil_gives_pils_pixels_along_one_axis(
    source: tuple[int, int], target: tuple[int, int], resample: str
) -> None:
    image = noise(sum(source), (source[1], source[0]))
    ours = resize_like_pil(image_to_tensor(image), target, resample)
    assert ours.dtype == torch.uint8
    assert torch.equal(ours, pil_resize(image, target, resample))


def test_resize_like_pil_on_both_axes_against_pillow() -> None:
    """Both axes: PIL's passes (horizontal, rounded to uint8, then vertical) as its source reads up to 12.3.
    Pillow 13 takes the vertical pass first for some sizes, which moves the rounding between the passes:
    measured here, and said in the README (a photo-like image: at most one level, on a few % of pixels)."""
    image = smooth((240, 180))
    exact = resize_like_pil(image_to_tensor(image), (160, 224), "bicubic")  # horizontal first in Pillow 13 too
    assert torch.equal(exact, pil_resize(image, (160, 224), "bicubic"))
    image = smooth((90, 70))
    ours = resize_like_pil(image_to_tensor(image), (64, 96), "bicubic")  # Pillow 13 goes vertical first here
    difference = (ours.int() - pil_resize(image, (64, 96), "bicubic").int()).abs()
    assert difference.max() <= 1
    assert (difference > 0).float().mean() < 0.1


def test_resize_like_pil_refuses_what_it_does_not_reproduce() -> None:
    with pytest.raises(ValueError, match="lanczos"):
        resize_like_pil(torch.zeros((3, 4, 4), dtype=torch.uint8), (2, 2), "lanczos")
    with pytest.raises(ValueError, match="uint8"):
        resize_like_pil(torch.zeros((3, 4, 4)), (2, 2))


@pytest.fixture(scope="module")
def processor(checkpoint: Path) -> Any:
    return AutoImageProcessor.from_pretrained(checkpoint)


@pytest.mark.parametrize("sizes", [[(90, 70)], [(64, 64), (130, 40), (300, 200), (17, 23)]])
def test_preprocessing_gives_the_processors_pixel_values(processor: Any, sizes: list[tuple[int, int]]) -> None:
    images = [noise(i, size) for i, size in enumerate(sizes)]
    reference = processor(images=images, return_tensors="pt")
    pre = Preprocessor.create(processor)
    assert pre is not None
    cpu = torch.device("cpu")
    prepared = [pre.prepare(image, on_host=True) for image in images]
    assert [list(p.grid) for p in prepared] == reference["image_grid_thw"].tolist()
    patches = pre.patches(prepared, cpu, torch.float32)
    assert torch.equal(pre.reference_layout(patches), reference["pixel_values"])


def test_preprocessing_on_the_device_path_resizes_with_torch(processor: Any) -> None:
    """What a GPU runs (uint8 pixels resized by ``resize_like_pil`` where the model is), here on CPU tensors:
    the processor's values where its resize is one pass, within one level where Pillow 13 goes vertical first."""
    pre = Preprocessor.create(processor)
    assert pre is not None
    cpu = torch.device("cpu")
    for image, exact in ((noise(7, (128, 40)), True), (smooth((90, 70)), False)):
        prepared = pre.prepare(image, on_host=False)  # as for a GPU: not resized on the host
        assert not prepared.resized
        ours = pre.reference_layout(pre.patches([prepared], cpu, torch.float32))
        theirs = processor(images=[image], return_tensors="pt")["pixel_values"]
        if exact:
            assert torch.equal(ours, theirs)
        else:  # one uint8 level is 1 / 255 / std after normalizing
            assert (ours - theirs).abs().max() <= 1 / 255 / min(processor.image_std) + 1e-6


def test_other_processors_fall_back_to_the_processor(processor: Any) -> None:
    changed = type(processor)(**{**processor.to_dict(), "resample": 2})
    assert Preprocessor.create(changed) is None


# -- the tower ----------------------------------------------------------------------------------------------
def test_attention_kinds() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_kind(cuda, torch.bfloat16, [16, 64]) == "varlen"
    assert attention_kind(cuda, torch.float32, [64, 64]) == "batched"
    assert attention_kind(cpu, torch.float32, [64]) == "batched"
    assert attention_kind(cpu, torch.float32, [16, 64]) == "masked"
    assert attention_kind(cpu, torch.float32, [4096, 1024]) == "grouped"


@pytest.mark.parametrize(
    ("sizes", "kind"),
    [
        ([(90, 70)], "batched"),
        ([(64, 64), (64, 64), (64, 64)], "batched"),
        ([(64, 64), (130, 40), (300, 200)], "masked"),
        ([(64, 64), (130, 40), (300, 200), (40, 130)], "grouped"),
    ],
)
def test_tower_matches_transformers(
    plugin: Qwen3VL2BPlugin, processor: Any, sizes: list[tuple[int, int]], kind: str, monkeypatch: Any
) -> None:
    if kind == "grouped":
        monkeypatch.setattr(vision, "MASK_LIMIT", 0)
    images = [noise(i + 10, size) for i, size in enumerate(sizes)]
    inputs = processor(images=images, return_tensors="pt")
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    lengths = [h * w for _, h, w in grids]
    assert attention_kind(torch.device("cpu"), torch.float32, lengths) == kind
    visual = plugin.model.model.visual
    fast = FastVision(visual)
    with torch.inference_mode():
        theirs = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], return_dict=True)
        ours, deepstack = fast(inputs["pixel_values"], grids)
        pre = Preprocessor.create(processor)
        assert pre is not None
        frames = pre.patches([pre.prepare(image, on_host=True) for image in images], fast.device, fast.dtype)
        from_frames, _ = fast(frames, grids)
    assert torch.allclose(ours, theirs.pooler_output, atol=1e-4, rtol=0)
    assert torch.allclose(from_frames, theirs.pooler_output, atol=1e-4, rtol=0)
    assert len(deepstack) == len(theirs.deepstack_features) > 0
    for mine, reference in zip(deepstack, theirs.deepstack_features):
        assert torch.allclose(mine, reference, atol=1e-4, rtol=0)


def test_varlen_failure_falls_back_to_sdpa(plugin: Qwen3VL2BPlugin, processor: Any, monkeypatch: Any) -> None:
    """Where ``varlen_attn`` cannot run (here: a CPU, which has no flash kernel), the tower says so once and
    attends with SDPA, giving the same outputs."""
    monkeypatch.setattr(vision, "VARLEN_ATTN", True)
    plain = vision.attention_kind
    monkeypatch.setattr(vision, "attention_kind", lambda *a: "varlen" if vision.VARLEN_ATTN else plain(*a))
    inputs = processor(images=[noise(1, (64, 64)), noise(2, (130, 40))], return_tensors="pt")
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    visual = plugin.model.model.visual
    with torch.inference_mode():
        ours, _ = FastVision(visual)(inputs["pixel_values"], grids)
        theirs = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], return_dict=True).pooler_output
    assert vision.VARLEN_ATTN is False
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


# -- the whole request --------------------------------------------------------------------------------------
def reference_inputs(checkpoint: Path, images: list[Image.Image]) -> dict[str, Any]:
    """transformers' processor inputs for one user turn with ``images``, built as in test_fidelity."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    content = [*({"type": "image"} for _ in images), {"type": "text", "text": "Describe these."}]
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs: dict[str, Any] = dict(processor(images=images, return_tensors="pt"))
    for grid in inputs["image_grid_thw"]:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // processor.merge_size**2), 1)
    text = text.replace("<|placeholder|>", "<|image_pad|>")
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    inputs["mm_token_type_ids"] = (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
    return inputs


def reference_generate(plugin: Qwen3VL2BPlugin, checkpoint: Path, images: list[Image.Image]) -> list[int]:
    """transformers' ``generate`` (greedy, never stopping early) on the processor's inputs."""
    inputs = reference_inputs(checkpoint, images)
    config = GenerationConfig(max_new_tokens=STEPS, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        out = plugin.model.generate(**inputs, generation_config=config)
    return list(out[0, inputs["input_ids"].shape[1] :].tolist())


def chat(images: list[Image.Image]) -> list[dict[str, Any]]:
    content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": "Describe these."}]
    return [{"role": "user", "content": content}]


def ours(plugin: Qwen3VL2BPlugin, images: list[Image.Image]) -> list[int]:
    prompt = plugin.prepare_chat(chat(images), {})
    assert isinstance(prompt.model_inputs["mm_encoder_outputs"], ImageEncoding)
    result = plugin.chat_completion(chat(images), max_new_tokens=STEPS, temperature=0, ignore_eos=True)
    return list(result.token_ids)


IMAGE_SETS = {
    "one image": [(90, 70)],
    "three sizes": [(64, 64), (130, 40), (300, 200)],
}


@pytest.mark.parametrize("case", list(IMAGE_SETS))
def test_greedy_tokens_match_transformers(plugin: Qwen3VL2BPlugin, checkpoint: Path, case: str) -> None:
    images = [noise(i + 20, size) for i, size in enumerate(IMAGE_SETS[case])]
    expected = reference_generate(plugin, checkpoint, images)
    assert len(expected) == STEPS
    assert ours(plugin, images) == expected
    language_model = plugin.model.model.language_model
    for module in (language_model, *language_model.layers):  # the DeepStack hooks are gone after the prefill
        assert not module._forward_hooks


def test_a_failed_prefill_leaves_no_deepstack_hooks(plugin: Qwen3VL2BPlugin, monkeypatch: Any) -> None:
    language_model = plugin.model.model.language_model
    prompt = plugin.prepare_chat(chat([noise(3, (64, 64))]), {})

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(language_model.layers[0].mlp, "forward", fail)  # before the DeepStack hook runs
    with plugin.engine.lock, pytest.raises(RuntimeError, match="out of memory"):
        plugin.engine.prefill(0, prompt)
    plugin.engine.release_slot(0)
    assert not language_model._forward_hooks
    assert not any(layer._forward_hooks for layer in language_model.layers)


@pytest.mark.parametrize("case", list(IMAGE_SETS))
def test_prefill_logits_match_transformers(plugin: Qwen3VL2BPlugin, checkpoint: Path, case: str) -> None:
    images = [noise(i + 20, size) for i, size in enumerate(IMAGE_SETS[case])]
    prompt = plugin.prepare_chat(chat(images), {})
    with plugin.engine.lock:
        logits = plugin.engine.prefill(0, prompt, all_logits=True)
        plugin.engine.release_slot(0)
    with torch.inference_mode():
        expected = plugin.model(**reference_inputs(checkpoint, images)).logits[0].float()
    assert torch.allclose(logits, expected, atol=1e-4, rtol=0), (logits - expected).abs().max()


@pytest.fixture(scope="module")
def compiled(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qwen3VL2BPlugin]:
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path_factory.mktemp("cfg") / "none.toml")})
    plugin = pm.activate_plugin(
        "qwen3_vl_2b", device="cpu", model_path=str(checkpoint), max_context=512, max_batch_size=2, compile=True
    )
    assert isinstance(plugin, Qwen3VL2BPlugin) and plugin.vision_path is not None
    yield plugin
    pm.shutdown()


def test_compiled_greedy_tokens_match_transformers(compiled: Qwen3VL2BPlugin, checkpoint: Path) -> None:
    for case in IMAGE_SETS.values():
        images = [noise(i + 20, size) for i, size in enumerate(case)]
        assert ours(compiled, images) == reference_generate(compiled, checkpoint, images)


def test_vision_fast_off_is_transformers_path(checkpoint: Path, tmp_path: Path) -> None:
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path / "none.toml")})
    try:
        plugin = pm.activate_plugin(
            "qwen3_vl_2b", device="cpu", model_path=str(checkpoint), max_context=256, vision_fast=False
        )
        assert isinstance(plugin, Qwen3VL2BPlugin)
        assert plugin.default_config()["vision_fast"] is True
        assert plugin.vision_path is None
        content = [{"type": "image", "image": noise(1, (90, 70))}, {"type": "text", "text": "Hi"}]
        prompt = plugin.prepare_chat([{"role": "user", "content": content}], {})
        assert set(prompt.model_inputs) == {"pixel_values", "image_grid_thw", "mm_token_type_ids"}
    finally:
        pm.shutdown()

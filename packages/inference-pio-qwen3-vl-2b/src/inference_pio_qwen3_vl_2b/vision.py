"""Qwen3-VL's vision path on the model's device (``vision_fast``, on by default).

transformers' path resizes and normalizes with PIL and numpy on the host, then runs the vision tower
with one attention call per image (``cu_seqlens`` split with ``.tolist()``), recomputes the position
embeddings for every request, and merges the DeepStack features with boolean indexing (a clone and a
host sync per layer). This module does the same arithmetic with:

- :class:`Preprocessor`: only the image sizes are planned on the host (``smart_resize``); the pixels
  travel as uint8, are resized where the model runs (:func:`~inference_pio.runtime.images.resize_like_pil`
  on a GPU, PIL itself on a CPU, where PIL is the fastest exact resizer), normalized by a lookup table
  built with the processor's own rescale/normalize (so the values are the processor's, bit for bit) and
  cut into patches by one permute. Images are one frame: the temporal patch axis is folded into the
  patch-embedding weight instead of repeating every pixel.
- :class:`FastVision`: the tower over all images at once — ``varlen_attn`` (flash, packed, no padding)
  on CUDA in half precision; one batched SDPA call when every image has the same patch count; one SDPA
  call with a block-diagonal mask otherwise (per patch-count group when that mask would be large). Position
  embeddings and rotary tables are cached per grid. Nothing in it reads a device value on the host.
- :class:`ImageEncoding`: handed to the prefill as ``mm_encoder_outputs``, it runs the tower when the
  prefill reads it (on the scheduler's thread, under the engine's lock) and adds the DeepStack features
  in place (``index_add_`` at token positions known on the host) from hooks on the first decoder layers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("inference_pio.qwen3_vl_2b")

MASK_LIMIT = 1 << 24
"""Largest block-diagonal mask (patches squared) built for images of different patch counts; above it, one
SDPA call per patch count."""
CACHE_GRIDS = 16
"""Grids whose position embeddings and rotary tables stay cached (per tower)."""
VARLEN_ATTN = True
"""Whether ``varlen_attn`` is used on CUDA: set to False (with a warning) the first time it fails."""


# -- preprocessing -----------------------------------------------------------------------------------------
@dataclass
class PreparedImage:
    """One image ready for the device: uint8 pixels [3, H, W] on the host (already resized when ``resized``),
    its target size in pixels and its patch grid (t, h, w)."""

    pixels: torch.Tensor
    size: tuple[int, int]
    grid: tuple[int, int, int]
    resized: bool

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


class Preprocessor:
    """The checkpoint's Qwen2-VL image processor, reproduced on the device.

    Built with :meth:`create`, which returns None (with the reason logged) for processors whose output it
    does not reproduce; the plugin then uses the processor itself.
    """

    def __init__(self, processor: Any, lut: torch.Tensor) -> None:
        self.patch_size = int(processor.patch_size)
        self.merge_size = int(processor.merge_size)
        self.temporal_patch_size = int(processor.temporal_patch_size)
        self.min_pixels = int(processor.size["shortest_edge"])
        self.max_pixels = int(processor.size["longest_edge"])
        self._lut = lut  # [3, 256] float32: the processor's rescale + normalize of each uint8 value
        self._luts: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def create(cls, processor: Any) -> Preprocessor | None:
        import numpy as np
        from PIL import Image

        name = type(processor).__name__
        why = None
        if name != "Qwen2VLImageProcessorPil":
            why = f"the image processor is {name}, not the PIL Qwen2VLImageProcessor it reproduces"
        elif int(processor.resample) != int(Image.Resampling.BICUBIC):
            why = f"the processor resamples with filter {processor.resample}, not bicubic"
        elif not (processor.do_resize and processor.do_rescale and processor.do_normalize):
            why = "the processor skips resizing, rescaling or normalizing"
        if why is not None:
            log.info("fast image preprocessing off: %s; the processor runs on the host", why)
            return None
        ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :], (3, 1, 256)).copy()
        values = processor.normalize(
            processor.rescale(ramp, processor.rescale_factor), processor.image_mean, processor.image_std
        )
        return cls(processor, torch.from_numpy(np.ascontiguousarray(values[:, 0, :], dtype=np.float32)))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The processor's resized (height, width) for an image of ``height`` x ``width`` pixels."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return int(h), int(w)

    def prepare(self, image: Any, *, on_host: bool, pin: bool = False) -> PreparedImage:
        """Plan ``image`` (an RGB PIL image). ``on_host``: resize it here with PIL (for a CPU device, where PIL is
        the fastest way to PIL's pixels); otherwise :meth:`patches` resizes it on the device. ``pin``: keep the
        pixels in page-locked memory (for a CUDA device)."""
        from PIL import Image

        from inference_pio.runtime.images import image_to_tensor

        height, width = self.target_size(image.height, image.width)
        grid = (1, height // self.patch_size, width // self.patch_size)
        if on_host and (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        return PreparedImage(image_to_tensor(image, pin=pin), (height, width), grid, on_host)

    def lut(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._luts:
            self._luts[key] = self._lut.to(device=device, dtype=dtype).reshape(-1)
        return self._luts[key]

    def patches(self, images: Sequence[PreparedImage], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """One frame of every image as patches [sum of patches, 3 * P * P] in ``dtype``, in the processor's patch
        order (2x2 merge blocks together) and values."""
        from inference_pio.runtime.images import resize_like_pil

        lut = self.lut(device, dtype)
        p, m = self.patch_size, self.merge_size
        offsets = (torch.arange(3, device=device) * 256).view(1, 1, 1, 1, 3, 1, 1)
        out = []
        for image in images:
            pixels = image.pixels.to(device, non_blocking=True)
            if not image.resized:
                pixels = resize_like_pil(pixels, image.size, "bicubic")
            _, gh, gw = image.grid
            blocks = pixels.view(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
            out.append(lut[blocks.long() + offsets].reshape(gh * gw, 3 * p * p))
        return out[0] if len(out) == 1 else torch.cat(out)

    def reference_layout(self, patches: torch.Tensor) -> torch.Tensor:
        """``patches`` as the processor lays out ``pixel_values``: each frame repeated over the temporal axis."""
        n = patches.shape[0]
        p, t = self.patch_size, self.temporal_patch_size
        frames = patches.view(n, 3, 1, p * p).expand(n, 3, t, p * p)
        return frames.reshape(n, 3 * t * p * p)


# -- the tower ----------------------------------------------------------------------------------------------
def attention_kind(device: torch.device, dtype: torch.dtype, lengths: Sequence[int]) -> str:
    """How :class:`FastVision` attends over images of ``lengths`` patches: ``varlen`` (flash over the packed
    patches), ``batched`` (one SDPA call, every image the same length), ``masked`` (one SDPA call with a
    block-diagonal mask) or ``grouped`` (one batched call per length, when the mask would be too large)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and VARLEN_ATTN:
        return "varlen"
    if len(set(lengths)) == 1:
        return "batched"
    return "masked" if sum(lengths) ** 2 <= MASK_LIMIT else "grouped"


class FastVision:
    """Runs a transformers ``Qwen3VLVisionModel``'s weights (shared, not copied) over many images at once."""

    def __init__(self, visual: Any) -> None:
        self.visual = visual
        config = visual.config
        self.merge = int(config.spatial_merge_size)
        self.heads = int(config.num_heads)
        self.deepstack_layers = list(config.deepstack_visual_indexes)
        proj = visual.patch_embed.proj
        weight = proj.weight  # [D, C, T, P, P]
        # Images repeat one frame over T: summing the weight over T is the same embedding for half the work.
        self.frame_weight = weight.float().sum(2).reshape(weight.shape[0], -1).to(weight.dtype)
        self.full_weight = weight.reshape(weight.shape[0], -1)
        self.bias = proj.bias
        self._grids: OrderedDict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.full_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.full_weight.dtype

    def _grid_tables(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Position embeddings [t*h*w, D] and rotary cos/sin for one grid, as transformers computes them."""
        cached = self._grids.get(grid)
        if cached is not None:
            self._grids.move_to_end(grid)
            return cached
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

        visual = self.visual
        thw = torch.tensor([grid])
        indices, weights = get_vision_interpolation_indices_and_weights(
            thw,
            num_grid_per_side=visual.num_grid_per_side,
            mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners,
            spatial_merge_size=self.merge,
        )
        device = self.device
        pos = (visual.pos_embed(indices.to(device)) * weights.to(device)[:, :, None]).sum(1).to(self.dtype)
        positions = get_vision_position_ids(thw, self.merge).to(device)
        cos, sin = visual.rotary_pos_emb(pos, positions)
        tables = (pos, cos.float(), sin.float())
        self._grids[grid] = tables
        if len(self._grids) > CACHE_GRIDS:
            self._grids.popitem(last=False)
        return tables

    def __call__(
        self, pixels: torch.Tensor, grids: Sequence[tuple[int, int, int]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Merged image embeddings [tokens, out] and the DeepStack features (one [tokens, out] per layer) of
        ``pixels`` — one frame per patch [N, 3*P*P] or the processor's layout [N, 3*T*P*P] — for ``grids``."""
        weight = self.frame_weight if pixels.shape[1] == self.frame_weight.shape[1] else self.full_weight
        hidden = F.linear(pixels.to(self.dtype), weight, self.bias)
        tables = [self._grid_tables(tuple(g)) for g in grids]  # type: ignore[arg-type]
        if len(tables) == 1:
            pos, cos, sin = tables[0]
        else:
            pos, cos, sin = (torch.cat(parts) for parts in zip(*tables))
        hidden = hidden + pos
        lengths = [g[1] * g[2] for g in grids for _ in range(g[0])]  # attention runs within each frame
        plan = _AttentionPlan(lengths, hidden.device, hidden.dtype)
        deepstack: list[torch.Tensor] = []
        for index, block in enumerate(self.visual.blocks):
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, plan)
            hidden = hidden + block.mlp(block.norm2(hidden))
            if index in self.deepstack_layers:
                merger = self.visual.deepstack_merger_list[self.deepstack_layers.index(index)]
                deepstack.append(merger(hidden))
        return self.visual.merger(hidden), deepstack

    def _attention(
        self, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: _AttentionPlan
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, self.heads, -1).unbind(1)
        q, k = _rotate(q, k, cos, sin)
        out = plan.attend(q, k, v, attn.scaling)
        return attn.proj(out.reshape(n, -1))  # type: ignore[no-any-return]


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision rotary embedding as transformers applies it (in float32, back to the input dtype)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        half = x32.shape[-1] // 2
        turned = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * cos + turned * sin).to(x.dtype)

    return rotate(q), rotate(k)


class _AttentionPlan:
    """Everything about one call's attention layout that depends only on the patch counts (built on the host)."""

    def __init__(self, lengths: list[int], device: torch.device, dtype: torch.dtype) -> None:
        self.lengths = lengths
        self.device = device
        self.dtype = dtype
        self._prepare()

    def _prepare(self) -> None:
        lengths, device = self.lengths, self.device
        self.kind = attention_kind(device, self.dtype, lengths)
        self.mask: torch.Tensor | None = None
        self.groups: list[tuple[int, torch.Tensor]] = []  # (images, their rows) per patch count
        starts = [0]
        for length in lengths:
            starts.append(starts[-1] + length)
        if self.kind == "varlen":
            self.cu_seqlens = torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True)
        elif self.kind == "masked":
            segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            self.mask = (segment[:, None] == segment[None, :]).to(device, non_blocking=True)
        elif self.kind == "grouped":
            for length in sorted(set(lengths)):
                rows = [torch.arange(s, s + length) for s, n in zip(starts, lengths) if n == length]
                self.groups.append((len(rows), torch.cat(rows).to(device, non_blocking=True)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of packed q, k, v [N, heads, hd] within each image; returns [N, heads, hd]."""
        if self.kind == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            longest = max(self.lengths)
            try:
                out = varlen_attn(q, k, v, self.cu_seqlens, self.cu_seqlens, longest, longest, scale=scale)
                return out  # type: ignore[return-value]
            except (RuntimeError, NotImplementedError) as exc:  # e.g. a GPU without the flash kernel
                log.warning("varlen_attn failed (%s); the vision tower uses scaled_dot_product_attention", exc)
                global VARLEN_ATTN
                VARLEN_ATTN = False
                self._prepare()
        if self.kind == "batched":
            return _sdpa_batched(q, k, v, len(self.lengths), scale)
        if self.kind == "masked":
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], self.mask, scale=scale
            )
            return out[0].transpose(0, 1)
        out = torch.empty_like(q)
        for images, rows in self.groups:
            q_rows, k_rows, v_rows = (t.index_select(0, rows) for t in (q, k, v))
            out.index_copy_(0, rows, _sdpa_batched(q_rows, k_rows, v_rows, images, scale))
        return out


def _sdpa_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, images: int, scale: float) -> torch.Tensor:
    """Attention within each of ``images`` equal-length images packed in q, k, v [N, heads, hd]."""
    n, heads, dim = q.shape
    qb, kb, vb = (t.view(images, n // images, heads, dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
    return out.transpose(1, 2).reshape(n, heads, dim)


# -- into the language model --------------------------------------------------------------------------------
class DeepStack:
    """Adds DeepStack features to the hidden states after the first decoder layers, in place, during one
    prefill: forward hooks registered by :meth:`arm` and removed after the last of those layers, or when the
    language model's forward ends in any way (so a failed prefill leaves nothing behind)."""

    def __init__(self, language_model: torch.nn.Module) -> None:
        self.language_model = language_model
        self.layers: Sequence[torch.nn.Module] = language_model.layers  # type: ignore[assignment]
        self._handles: list[Any] = []
        self._positions: torch.Tensor | None = None
        self._features: list[torch.Tensor] = []
        self._length = 0

    def arm(self, positions: torch.Tensor, features: list[torch.Tensor], length: int) -> None:
        """Add ``features[i]`` at ``positions`` after layer ``i`` in the next forward over ``length`` tokens."""
        self.disarm()
        if not features:
            return
        self._positions, self._features, self._length = positions, features, length
        for index in range(len(features)):
            self._handles.append(self.layers[index].register_forward_hook(self._hook(index)))
        self._handles.append(self.language_model.register_forward_hook(self._end, always_call=True))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._positions, self._features, self._length = [], None, [], 0

    def _end(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.disarm()

    def _hook(self, index: int) -> Any:
        def add(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            if self._positions is None or output.shape[1] != self._length:  # not the prefill it was armed for
                self.disarm()
                return output
            features = self._features[index].to(output.device, output.dtype)  # no-ops unless the model is split
            output[0].index_add_(0, self._positions.to(output.device), features)
            if index == len(self._features) - 1:
                self.disarm()
            return output

        return add


class ImageEncoding(Mapping[str, Any]):
    """``mm_encoder_outputs`` for transformers' Qwen3-VL forward: the images' embeddings, computed when the
    prefill first reads them. The DeepStack features go in through :class:`DeepStack` (transformers is handed
    none, so it neither copies nor boolean-indexes them)."""

    def __init__(
        self,
        vision: FastVision,
        deepstack: DeepStack,
        preprocessor: Preprocessor | None,
        images: Sequence[PreparedImage] | torch.Tensor,
        grids: Sequence[tuple[int, int, int]],
        positions: list[int],
        length: int,
    ) -> None:
        """``positions``: where the image tokens sit in the prompt of ``length`` tokens."""
        self.vision = vision
        self.deepstack = deepstack
        self.preprocessor = preprocessor
        self.images = images
        self.grids = list(grids)
        self.positions = positions
        self.length = length
        self._output: Any = None

    def __getitem__(self, key: str) -> Any:
        if key != "image":
            raise KeyError(key)
        if self._output is None:
            self._output = self._encode()
        return self._output

    def __iter__(self) -> Iterator[str]:
        return iter(("image",))

    def __len__(self) -> int:
        return 1

    def _encode(self) -> Any:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        device, dtype = self.vision.device, self.vision.dtype
        if isinstance(self.images, torch.Tensor):  # the processor's pixel_values
            pixels = self.images.to(device)
        else:
            assert self.preprocessor is not None
            pixels = self.preprocessor.patches(self.images, device, dtype)
        embeds, deepstack = self.vision(pixels, self.grids)
        positions = torch.tensor(self.positions, dtype=torch.long).to(device, non_blocking=True)
        self.deepstack.arm(positions, deepstack, self.length)
        return BaseModelOutputWithDeepstackFeatures(pooler_output=(embeds,), deepstack_features=[])


class VisionPath:
    """What the plugin keeps when ``vision_fast`` is on: the preprocessor (None: the processor runs), the tower
    and the DeepStack hooks of one model."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.preprocessor = Preprocessor.create(processor) if processor is not None else None
        self.vision = FastVision(model.model.visual)
        self.deepstack = DeepStack(model.model.language_model)

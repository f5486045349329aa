"""Loading request images safely (paths, PIL images, bytes and data: URLs, with size limits), and resizing them
on the model's device exactly as PIL does."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_pio.errors import InvalidRequestError

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_ASPECT = 150  # the Qwen-VL resizer refuses beyond 200:1; letterbox before that


def load_image(source: Any, *, max_pixels: int, where: str = "image") -> Any:
    """Return an RGB ``PIL.Image`` from ``source``, or raise ``InvalidRequestError`` saying why not."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data: Any = io.BytesIO(bytes(source))
            label = f"{where} (bytes)"
        elif isinstance(source, str) and source.startswith("data:"):
            header, _, payload = source.partition(",")
            if ";base64" not in header:
                raise InvalidRequestError(
                    f"{where}: data URL must be base64-encoded (data:image/png;base64,...)", where
                )
            try:
                data = io.BytesIO(base64.b64decode(payload, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise InvalidRequestError(f"{where}: the data URL is not valid base64 ({exc})", where) from exc
            label = f"{where} (data URL)"
        elif isinstance(source, str) and source.startswith(("http://", "https://")):
            raise InvalidRequestError(
                f"{where}: remote image URLs are not fetched; send the image as a data: URL, bytes or a local path",
                where,
            )
        elif isinstance(source, (str, Path)):
            path = Path(source).expanduser()
            if not path.is_file():
                raise InvalidRequestError(f"{where}: no image file at {path}", where)
            data, label = path, f"{where} ({path})"
        else:
            raise InvalidRequestError(
                f"{where}: unsupported image type {type(source).__name__}; use a path, PIL image, bytes or data: URL",
                where,
            )
        previous = Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check below
                Image.MAX_IMAGE_PIXELS = max_pixels
                image = Image.open(data)
                if image.width * image.height > max_pixels:
                    raise InvalidRequestError(
                        f"{label} is {image.width}x{image.height} = {image.width * image.height} pixels, more than "
                        f"the limit of {max_pixels} (max_image_pixels)",
                        where,
                    )
                image.load()
        except Image.DecompressionBombError as exc:
            raise InvalidRequestError(f"{label} looks like a decompression bomb: {exc}", where) from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            if isinstance(exc, InvalidRequestError):
                raise
            raise InvalidRequestError(f"{label} is not a readable image: {exc}", where) from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    if image.width * image.height > max_pixels:
        raise InvalidRequestError(
            f"{where} is {image.width}x{image.height}, more than max_image_pixels={max_pixels}", where
        )
    image = image.convert("RGB")
    return letterbox(image)


def letterbox(image: Any) -> Any:
    """Pad extreme aspect ratios (e.g. 1x4000) so the short side is at least 1/MAX_ASPECT of the long one."""
    from PIL import Image

    w, h = image.size
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return image
    side = -(-max(w, h) // MAX_ASPECT)
    new = Image.new("RGB", (max(w, side), max(h, side)))
    new.paste(image, (0, 0))
    return new


# -- PIL's 8-bit resampling as torch ops ------------------------------------------------------------------
# Processors resize with PIL on the host (uint8 in, uint8 out). ``resize_like_pil`` computes the same
# pixels with integer tensor ops on any device: PIL's coefficients (Resample.c: ``precompute_coeffs``,
# ``normalize_coeffs_8bpc``), its 22-bit fixed point, horizontal pass first, and the rounding to uint8
# between the two passes. Tests compare it with PIL pixel for pixel.

PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit images


def _bicubic(x: np.ndarray) -> np.ndarray:
    import numpy as np

    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))  # type: ignore[no-any-return]


def _bilinear(x: np.ndarray) -> np.ndarray:
    import numpy as np

    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)  # type: ignore[no-any-return]


FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}
"""The resampling filters ``resize_like_pil`` reproduces: name -> (kernel, support)."""


@lru_cache(maxsize=64)
def pil_coefficients(in_size: int, out_size: int, resample: str) -> tuple[Any, Any]:
    """PIL's taps for resizing one axis from ``in_size`` to ``out_size``: first input index per output
    ([out] int64) and fixed-point weights ([out, ksize] int32, zero past each output's last tap)."""
    import numpy as np

    kernel, support = FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates; both are >= 0 here
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    weights = kernel((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(taps[None, :] < xmax[:, None], weights, 0.0)
    total = np.zeros(out_size)
    for t in range(ksize):  # PIL sums the taps in order; so do we, to round the same way
        total += weights[:, t]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    return xmin, fixed


def _resample_last(image: torch.Tensor, out_size: int, resample: str) -> torch.Tensor:
    """One PIL pass along the last dim of an int32 image (values 0..255); returns int32 values 0..255.

    Each output reads a window of ``ksize`` inputs from its first tap (zero-padded on the right, where its
    weights are zero): one gather of windows, one multiply, one sum.
    """
    import torch
    import torch.nn.functional as F

    start, fixed = pil_coefficients(image.shape[-1], out_size, resample)
    device = image.device
    ksize = fixed.shape[1]
    windows = F.pad(image, (0, ksize)).unfold(-1, ksize, 1)  # [..., in + 1, ksize], a view
    picked = windows.index_select(-2, torch.from_numpy(start).to(device, non_blocking=True))
    weights = torch.from_numpy(fixed).to(device, non_blocking=True)
    total = (picked * weights).sum(-1) + (1 << (PRECISION_BITS - 1))
    return (total >> PRECISION_BITS).clamp_(0, 255).to(torch.int32)


def resize_like_pil(image: torch.Tensor, size: tuple[int, int], resample: str = "bicubic") -> torch.Tensor:
    """``image`` (uint8 [..., H, W] on any device) resized to ``size`` = (height, width) with the pixels
    ``PIL.Image.resize`` gives for the same uint8 image and filter (``"bicubic"`` or ``"bilinear"``)."""
    import torch

    if resample not in FILTERS:
        raise ValueError(f"resize_like_pil reproduces {sorted(FILTERS)}, not {resample!r}")
    if image.dtype != torch.uint8:
        raise ValueError(f"resize_like_pil takes uint8 pixels (what PIL resizes), got {image.dtype}")
    height, width = size
    if (height, width) == tuple(image.shape[-2:]):
        return image.clone()
    values = image.to(torch.int32)
    if width != image.shape[-1]:  # PIL's order: horizontal pass, rounded to uint8, then vertical
        values = _resample_last(values, width, resample)
    if height != image.shape[-2]:
        values = _resample_last(values.transpose(-1, -2), height, resample).transpose(-1, -2)
    return values.to(torch.uint8)


def image_to_tensor(image: Any, *, pin: bool = False) -> torch.Tensor:
    """An RGB ``PIL.Image`` as a uint8 tensor [3, H, W] on the host (``pin``: in page-locked memory, so the
    copy to a GPU can overlap other work)."""
    import numpy as np
    import torch

    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    pixels = pixels.contiguous()
    return pixels.pin_memory() if pin else pixels

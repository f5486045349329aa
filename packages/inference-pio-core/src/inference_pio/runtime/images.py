"""Loading request images safely: paths, PIL images, bytes and data: URLs, with size limits."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Any

from inference_pio.errors import InvalidRequestError

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

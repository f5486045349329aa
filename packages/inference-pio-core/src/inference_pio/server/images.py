"""Image URLs in chat messages: ``http(s)`` URLs are fetched here, only from allow-listed hosts.

``data:`` URLs and anything else pass through to the plugin, which decodes and checks them.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from typing import Any

from inference_pio.server.errors import APIError


def fetch_image(url: str, allowed_hosts: frozenset[str], max_bytes: int, where: str) -> bytes:
    """The bytes at ``url`` (at most ``max_bytes``), or a 400 naming ``where`` in the request."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host not in allowed_hosts:
        allowed = ", ".join(sorted(allowed_hosts)) or "none"
        raise APIError(
            400,
            f"{where}: image URLs from {host or url!r} are not allowed (allowed hosts: {allowed}); "
            "send the image as a data: URL",
            param=where,
            code="image_url_not_allowed",
        )
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # the host is allow-listed
            data: bytes = resp.read(max_bytes + 1)
    except (OSError, ValueError) as exc:
        raise APIError(400, f"{where}: could not fetch {url}: {exc}", param=where) from exc
    if len(data) > max_bytes:
        raise APIError(400, f"{where}: the image at {url} is larger than {max_bytes} bytes", param=where)
    return data


def resolve_images(
    messages: list[dict[str, Any]], allowed_hosts: frozenset[str], max_bytes: int
) -> list[dict[str, Any]]:
    """``messages`` with every ``image_url`` part that names an http(s) URL replaced by the fetched bytes."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if isinstance(url, str) and url.startswith(("http://", "https://")):
                        data = fetch_image(url, allowed_hosts, max_bytes, f"messages[{i}].content[{j}]")
                        part = {"type": "image", "image": data}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out

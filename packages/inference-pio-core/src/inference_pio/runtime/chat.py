"""OpenAI-style chat messages: validation, and template rendering that keeps user text inert.

User-supplied text is swapped for sentinels before the chat template runs and tokenized
separately afterwards with special-token parsing off, so ``<|im_start|>`` or ``<|image_pad|>``
typed by a user stays plain text and can never act as a role, control or image token.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference_pio.errors import InvalidRequestError

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 1024


@dataclass
class ChatMessage:
    role: str
    texts: list[str] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    order: list[tuple[str, int]] = field(default_factory=list)  # ("text"|"image", index) in content order


def _image_source(part: Mapping[str, Any], where: str) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        if isinstance(url, Mapping):
            url = url.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidRequestError(
                f"{where}: image_url part needs image_url.url as a non-empty string", param=f"{where}.image_url"
            )
        return url
    source = part.get("image", part.get("url", part.get("path")))
    if source is None:
        raise InvalidRequestError(
            f"{where}: image part needs 'image' (path, PIL image, bytes or data: URL)", param=where
        )
    return source


def normalize_messages(messages: Any, *, allow_images: bool, max_images: int) -> list[ChatMessage]:
    """Validate OpenAI-style messages into :class:`ChatMessage` objects, or raise ``InvalidRequestError``."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError("messages must be a list of {'role': ..., 'content': ...} objects", "messages")
    if not messages:
        raise InvalidRequestError("messages is empty; send at least one user message", "messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(f"{len(messages)} messages is more than the limit of {MAX_MESSAGES}", "messages")
    out: list[ChatMessage] = []
    n_images = 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise InvalidRequestError(f"{where} must be an object with role and content", where)
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = msg.get("content")
        cm = ChatMessage(str(role))
        if content is None:
            content = ""
        if isinstance(content, str):
            cm.texts.append(content)
            cm.order.append(("text", 0))
        elif isinstance(content, Sequence):
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                if isinstance(part, str):
                    part = {"type": "text", "text": part}
                if not isinstance(part, Mapping):
                    raise InvalidRequestError(f"{pwhere} must be an object with a type", pwhere)
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise InvalidRequestError(f"{pwhere}.text must be a string", f"{pwhere}.text")
                    cm.order.append(("text", len(cm.texts)))
                    cm.texts.append(text)
                elif kind in ("image_url", "image"):
                    if not allow_images:
                        raise InvalidRequestError(
                            f"{pwhere}: this model reads text only; remove the image part", pwhere
                        )
                    if role != "user":
                        raise InvalidRequestError(f"{pwhere}: images are accepted in user messages only", pwhere)
                    n_images += 1
                    if n_images > max_images:
                        raise InvalidRequestError(
                            f"more than {max_images} images in one request (max_images)", "messages"
                        )
                    cm.order.append(("image", len(cm.images)))
                    cm.images.append(_image_source(part, pwhere))
                else:
                    raise InvalidRequestError(
                        f"{pwhere}.type must be 'text', 'image_url' or 'image', got {kind!r}", f"{pwhere}.type"
                    )
        else:
            raise InvalidRequestError(f"{where}.content must be a string or a list of parts", f"{where}.content")
        out.append(cm)
    if not any(t.strip() for m in out for t in m.texts) and not any(m.images for m in out):
        raise InvalidRequestError("the prompt is empty: every message has empty content", "messages")
    return out


@dataclass(frozen=True)
class Segment:
    text: str
    user: bool  # True: client text, tokenize with special tokens off


def render_protected(
    messages: Sequence[ChatMessage],
    render: Callable[[list[dict[str, Any]]], str],
    *,
    structured_content: bool,
) -> list[Segment]:
    """Render ``messages`` with the model's template; return template and user text as separate segments.

    ``render`` receives template-ready messages (content a string, or a list of text/image parts
    when ``structured_content``) whose texts are sentinels, and returns the rendered prompt.
    """
    nonce = secrets.token_hex(8)
    texts: list[str] = []

    def sentinel(text: str) -> str:
        texts.append(text)
        return f"\ue000{nonce}:{len(texts) - 1}\ue001"

    template_messages: list[dict[str, Any]] = []
    for m in messages:
        if structured_content:
            parts: list[dict[str, Any]] = []
            for kind, idx in m.order:
                if kind == "text":
                    parts.append({"type": "text", "text": sentinel(m.texts[idx])})
                else:
                    parts.append({"type": "image"})
            content: Any = parts
        else:
            content = sentinel("".join(m.texts)) if m.texts else ""
        template_messages.append({"role": m.role, "content": content})
    rendered = render(template_messages)
    segments: list[Segment] = []
    pattern = re.compile("\ue000" + nonce + r":(\d+)\ue001")
    pos = 0
    for match in pattern.finditer(rendered):
        if match.start() > pos:
            segments.append(Segment(rendered[pos : match.start()], False))
        segments.append(Segment(texts[int(match.group(1))], True))
        pos = match.end()
    if pos < len(rendered):
        segments.append(Segment(rendered[pos:], False))
    return segments

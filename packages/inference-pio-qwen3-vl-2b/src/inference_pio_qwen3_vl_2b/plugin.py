"""``Qwen3VL2BPlugin``: what is specific to Qwen3-VL on top of the shared runtime — images and M-RoPE."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from inference_pio.common.interfaces import Message
from inference_pio.common.metadata import ModelPluginMetadata
from inference_pio.parsers import ToolCallParser
from inference_pio.runtime.hf_plugin import HFTextPlugin
from inference_pio_qwen3_vl_2b.metadata import METADATA
from inference_pio_qwen3_vl_2b.parsers import Qwen3VLToolCallParser
from inference_pio_qwen3_vl_2b.template import CHAT_TEMPLATE
from inference_pio_qwen3_vl_2b.tool_grammar import tool_call_grammar

log = logging.getLogger("inference_pio.qwen3_vl_2b")


class Qwen3VL2BPlugin(HFTextPlugin):
    """Qwen3-VL-2B-Instruct: chat over text and images."""

    METADATA: ClassVar[ModelPluginMetadata] = METADATA
    MODEL_CLASS: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    MROPE: ClassVar[bool] = True
    vision_path: Any = None

    def default_config(self) -> dict[str, Any]:
        """``vision_fast``: images are preprocessed on the model's device and the vision tower runs over all of
        a request's images at once (see :mod:`.vision`); False keeps transformers' processor and tower. Set it
        in the config file (``[plugins.qwen3_vl_2b] vision_fast = false``), as
        ``INFERENCE_PIO_QWEN3_VL_2B__VISION_FAST=0`` or as ``activate_plugin(..., vision_fast=False)``."""
        return {"vision_fast": True}

    def use_model(self, model: Any, *, vision_fast: bool | None = None, **kwargs: Any) -> None:
        """Attach ``model`` as usual, with the fast vision path unless switched off; ``vision_fast=None`` takes
        the activation's setting (default on)."""
        from inference_pio_qwen3_vl_2b.vision import VisionPath

        fast = bool(self.settings.get("vision_fast", True)) if vision_fast is None else vision_fast
        if self.vision_path is not None:
            self.vision_path.deepstack.disarm()
        processor = getattr(self, "image_processor", None)
        self.vision_path = VisionPath(model, processor) if fast else None
        if fast:
            where = "on the device" if self.vision_path.preprocessor is not None else "by the processor (host)"
            log.info("%s: fast vision path, images preprocessed %s", self.metadata.name, where)
        super().use_model(model, **kwargs)

    def cleanup(self) -> None:
        if self.vision_path is not None:
            self.vision_path.deepstack.disarm()
        self.vision_path = None
        super().cleanup()

    def load_processor(self, source: str, config: Mapping[str, Any]) -> None:
        from transformers import AutoImageProcessor

        super().load_processor(source, config)
        self.image_processor = AutoImageProcessor.from_pretrained(
            source,
            revision=config.get("revision"),
            local_files_only=bool(config.get("local_files_only")),
            trust_remote_code=False,
        )
        self.chat_template = self._find_template(source, config)
        vocab = self.tokenizer.get_vocab()
        self.image_pad_id = int(vocab["<|image_pad|>"])

    def _find_template(self, source: str, config: Mapping[str, Any]) -> str:
        """The checkpoint's own template (chat_template.jinja / .json, local or from the hub cache), else the
        tokenizer's, else ours."""
        import json

        from transformers.utils import cached_file

        options = {
            "revision": config.get("revision"),
            "local_files_only": bool(config.get("local_files_only")),
            "_raise_exceptions_for_missing_entries": False,
            "_raise_exceptions_for_connection_errors": False,
        }
        for name in ("chat_template.jinja", "chat_template.json"):
            found = cached_file(source, name, **options)
            if found:
                text = Path(found).read_text(encoding="utf-8")
                return str(json.loads(text)["chat_template"]) if name.endswith(".json") else text
        return str(getattr(self.tokenizer, "chat_template", None) or CHAT_TEMPLATE)

    def apply_template(
        self, messages: list[dict[str, Any]], options: Mapping[str, Any], tools: list[dict[str, Any]] | None = None
    ) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=True,
                **options,
            )
        )

    def tool_parser(self, tools: Sequence[Mapping[str, Any]]) -> ToolCallParser | None:
        return Qwen3VLToolCallParser(tools)

    def tool_grammar(
        self,
        tools: Sequence[Mapping[str, Any]],
        function: str | None,
        options: Mapping[str, Any],
        parallel: bool = True,
    ) -> str | None:
        return tool_call_grammar(tools, function, parallel=parallel)

    def prepare_chat(self, messages: Sequence[Message], options: dict[str, Any], tools: Any = None) -> Any:
        import torch

        from inference_pio.errors import InvalidRequestError
        from inference_pio.runtime.chat import normalize_messages
        from inference_pio.runtime.contract import Prompt
        from inference_pio.runtime.images import load_image

        max_pixels = int(self.settings.get("max_image_pixels", 16_777_216))
        norm = normalize_messages(messages, allow_images=True, max_images=int(self.settings.get("max_images", 8)))
        images = [
            load_image(src, max_pixels=max_pixels, where=f"image {i}")
            for i, src in enumerate(img for m in norm for img in m.images)
        ]
        pieces = self.render_chat(norm, options, tools)
        try:
            prepared, grids, pixel_values = self._prepare_images(images)
        except ValueError as exc:
            raise InvalidRequestError(f"an image could not be processed: {exc}", "messages") from exc
        merge = int(self.image_processor.merge_size) ** 2
        counts = [t * h * w // merge for t, h, w in grids]
        ids: list[int] = []
        image_index = 0
        for piece in pieces:
            for token in self.encode_template(piece):
                if token == self.image_pad_id:
                    if image_index >= len(counts):
                        raise InvalidRequestError(
                            "the chat template produced more image placeholders than images", "messages"
                        )
                    ids += [token] * counts[image_index]
                    image_index += 1
                else:
                    ids.append(token)
        if image_index != len(counts):
            raise InvalidRequestError(f"{len(counts)} images but the chat template placed {image_index}", "messages")
        if not images:
            return Prompt(ids)
        input_ids = torch.tensor([ids])
        mm_types = (input_ids == self.image_pad_id).int()
        grid_thw = torch.tensor(grids, dtype=torch.long)
        position_ids, deltas = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_types, image_grid_thw=grid_thw
        )
        device, dtype = self.engine.device, self.engine.dtype
        model_inputs: dict[str, Any]
        if self.vision_path is not None:
            from inference_pio_qwen3_vl_2b.vision import ImageEncoding

            path = self.vision_path
            source: Any = prepared if pixel_values is None else pixel_values
            positions = [i for i, token in enumerate(ids) if token == self.image_pad_id]
            encoding = ImageEncoding(path.vision, path.deepstack, path.preprocessor, source, grids, positions, len(ids))
            model_inputs = {"mm_encoder_outputs": encoding}
        else:
            model_inputs = {
                "pixel_values": pixel_values.to(device=device, dtype=dtype),
                "image_grid_thw": grid_thw.to(device),
                "mm_token_type_ids": mm_types.to(device),
            }
        return Prompt(ids, model_inputs, position_ids, int(deltas.reshape(-1)[0]))

    def _prepare_images(self, images: list[Any]) -> tuple[list[Any], list[tuple[int, int, int]], Any]:
        """Each image's patch grid, with either the images prepared for the device (fast preprocessing) or the
        processor's ``pixel_values`` (None when there are no images)."""
        if not images:
            return [], [], None
        preprocessor = self.vision_path.preprocessor if self.vision_path is not None else None
        if preprocessor is not None:
            kind = self.engine.device.type
            prepared = [preprocessor.prepare(image, on_host=kind == "cpu", pin=kind == "cuda") for image in images]
            return prepared, [p.grid for p in prepared], None
        pixel_inputs = self.image_processor(images=images, return_tensors="pt")
        grids = [(int(t), int(h), int(w)) for t, h, w in pixel_inputs["image_grid_thw"].tolist()]
        return [], grids, pixel_inputs["pixel_values"]


def create_qwen3_vl_2b_plugin() -> Qwen3VL2BPlugin:
    """Factory named in the design document; cheap (no weights are loaded here)."""
    return Qwen3VL2BPlugin()

"""``Glm47FlashPlugin``: what is specific to GLM-4.7-Flash on top of the shared runtime — its chat format."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from inference_pio.common.interfaces import PluginOptions
from inference_pio.common.metadata import ModelPluginMetadata
from inference_pio.parsers import ReasoningParser, ToolCallParser
from inference_pio.runtime.hf_plugin import HFTextPlugin
from inference_pio_glm_4_7_flash.metadata import METADATA
from inference_pio_glm_4_7_flash.parsers import Glm47ReasoningParser, Glm47ToolCallParser, split_reasoning
from inference_pio_glm_4_7_flash.template import CHAT_TEMPLATE


class Glm47FlashPlugin(HFTextPlugin):
    """GLM-4.7-Flash: chat with thinking on (default) or off (``enable_thinking=False``)."""

    METADATA: ClassVar[ModelPluginMetadata] = METADATA
    MODEL_CLASS: ClassVar[str] = "Glm4MoeLiteForCausalLM"

    class Options(PluginOptions):
        enable_thinking: bool = True
        """Think (``<think>...</think>``) before answering; False starts the answer directly."""
        clear_thinking: bool = True
        """Drop the reasoning of assistant turns before the last user message (the template's default);
        False keeps it in the prompt ("preserved thinking", for agents that send ``reasoning_content`` back)."""

    def apply_template(
        self, messages: list[dict[str, Any]], options: Mapping[str, Any], tools: list[dict[str, Any]] | None = None
    ) -> str:
        template = getattr(self.tokenizer, "chat_template", None) or CHAT_TEMPLATE
        chosen = self.Options.parse(options)
        return str(
            self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=chosen.enable_thinking,
                clear_thinking=chosen.clear_thinking,
            )
        )

    def tool_parser(self, tools: Sequence[Mapping[str, Any]]) -> ToolCallParser | None:
        return Glm47ToolCallParser(tools)

    def reasoning_parser(self, options: Mapping[str, Any]) -> ReasoningParser | None:
        return Glm47ReasoningParser() if options.get("enable_thinking", True) else None

    def split_reasoning(self, content: str) -> tuple[str, str] | None:
        return split_reasoning(content)


def create_glm_4_7_flash_plugin() -> Glm47FlashPlugin:
    """Factory named in the design document; cheap (no weights are loaded here)."""
    return Glm47FlashPlugin()

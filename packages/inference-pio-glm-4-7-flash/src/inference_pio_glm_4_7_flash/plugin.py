"""``Glm47FlashPlugin``: what is specific to GLM-4.7-Flash on top of the shared runtime — its chat format."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from inference_pio.common.interfaces import PluginOptions
from inference_pio.common.memory import WeightSizes
from inference_pio.common.metadata import ModelPluginMetadata
from inference_pio.parsers import ReasoningParser, ToolCallParser
from inference_pio.runtime.hf_plugin import HFTextPlugin
from inference_pio_glm_4_7_flash.metadata import METADATA
from inference_pio_glm_4_7_flash.parsers import Glm47ReasoningParser, Glm47ToolCallParser, split_reasoning
from inference_pio_glm_4_7_flash.template import CHAT_TEMPLATE
from inference_pio_glm_4_7_flash.tool_grammar import tool_call_grammar

log = logging.getLogger("inference_pio.glm_4_7_flash")


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

    def default_config(self) -> dict[str, Any]:
        """``mla_absorb``: decode steps attend in MLA's latent space (see :mod:`.mla`); False keeps
        transformers' attention, which re-expands the whole cache every step. Set it in the config file
        (``[plugins.glm_4_7_flash] mla_absorb = false``), as ``INFERENCE_PIO_GLM_4_7_FLASH__MLA_ABSORB=0``
        or as ``activate_plugin(..., mla_absorb=False)``.

        ``moe_fast``: the MoE blocks route and compute their experts without host syncs (see :mod:`.moe`);
        False keeps transformers' block. Set like ``mla_absorb`` (``INFERENCE_PIO_GLM_4_7_FLASH__MOE_FAST=0``)."""
        return {"mla_absorb": True, "moe_fast": True}

    def use_model(
        self, model: Any, *, mla_absorb: bool | None = None, moe_fast: bool | None = None, **kwargs: Any
    ) -> None:
        """Install the model's fast paths on ``model`` (those not switched off), then attach it as usual;
        ``None`` takes the activation's setting (default on)."""
        from inference_pio_glm_4_7_flash import mla, moe

        absorb = bool(self.settings.get("mla_absorb", True)) if mla_absorb is None else mla_absorb
        if absorb:
            count = mla.install_absorbed_mla(model)
            log.info("%s: absorbed MLA decode in %d attention layer(s)", self.metadata.name, count)
        else:
            mla.uninstall_absorbed_mla(model)
        fast = bool(self.settings.get("moe_fast", True)) if moe_fast is None else moe_fast
        if fast:
            count = moe.install_fast_moe(model)
            log.info("%s: fast MoE in %d block(s)", self.metadata.name, count)
        else:
            moe.uninstall_fast_moe(model)
        super().use_model(model, **kwargs)

    def weight_sizes(self, directory: Path) -> WeightSizes:
        """For the memory plan: the routed experts in :mod:`.quant`'s int8/int4 formats, and the linear layers
        bitsandbytes keeps in float for GLM (:func:`.quant.bnb_skip_modules`)."""
        import transformers

        from inference_pio.runtime.devices import weight_sizes
        from inference_pio_glm_4_7_flash import quant

        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        skip = quant.bnb_skip_modules(config)
        return weight_sizes(self.MODEL_CLASS, directory, skip_modules=skip, custom=quant.expert_parameter_bytes)

    def load_pretrained(self, cls: Any, source: str, kwargs: dict[str, Any]) -> Any:
        """With int8/int4 weights the routed experts are quantized too, streamed from the checkpoint
        (see :mod:`.quant`); quantization ``none`` loads as usual."""
        quantization = "none" if self.memory_plan is None else self.memory_plan.quantization
        if quantization == "none":
            return super().load_pretrained(cls, source, kwargs)
        from inference_pio_glm_4_7_flash import quant

        return quant.load_quantized(source, kwargs, quantization)

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

    def tool_grammar(
        self,
        tools: Sequence[Mapping[str, Any]],
        function: str | None,
        options: Mapping[str, Any],
        parallel: bool = True,
    ) -> str | None:
        return tool_call_grammar(
            tools, function, parallel=parallel, close_thinking=bool(options.get("enable_thinking", True))
        )

    def reasoning_parser(self, options: Mapping[str, Any]) -> ReasoningParser | None:
        return Glm47ReasoningParser() if options.get("enable_thinking", True) else None

    def split_reasoning(self, content: str) -> tuple[str, str] | None:
        return split_reasoning(content)


def create_glm_4_7_flash_plugin() -> Glm47FlashPlugin:
    """Factory named in the design document; cheap (no weights are loaded here)."""
    return Glm47FlashPlugin()

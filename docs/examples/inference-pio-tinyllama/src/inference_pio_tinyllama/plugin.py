"""The plugin: ``HFTextPlugin`` does loading, memory planning, batching, streaming and the chat template."""

from __future__ import annotations

from typing import ClassVar

from inference_pio import ModelPluginMetadata
from inference_pio.runtime.hf_plugin import HFTextPlugin
from inference_pio_tinyllama.hooks import METADATA


class TinyLlamaPlugin(HFTextPlugin):
    METADATA: ClassVar[ModelPluginMetadata] = METADATA
    MODEL_CLASS: ClassVar[str] = "LlamaForCausalLM"  # looked up as transformers.LlamaForCausalLM


def create_plugin() -> TinyLlamaPlugin:
    return TinyLlamaPlugin()

"""Qwen3-VL-Instruct's published ChatML chat template and its tokens.

The template is the published file, shipped unchanged in ``chat_template.jinja`` (source and license in
its header). Used when a checkpoint ships no template of its own and by the tiny test checkpoint.
"""

from importlib.resources import files

PUBLISHED_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
"""sha256 of the published template's bytes (checked by the tests)."""


def _published_template() -> str:
    text = files("inference_pio_qwen3_vl_2b").joinpath("chat_template.jinja").read_text(encoding="utf-8")
    return text.split("-#}\n", 1)[1]  # the body after our header comment


CHAT_TEMPLATE = _published_template()

# Control tokens: roles, vision placeholders. Never produced from user text.
CONTROL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added tokens that are not special in the published tokenizer (kept by skip_special_tokens).
PLAIN_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
SPECIAL_TOKENS = CONTROL_TOKENS + PLAIN_TOKENS  # every added token, in the published vocabulary's order

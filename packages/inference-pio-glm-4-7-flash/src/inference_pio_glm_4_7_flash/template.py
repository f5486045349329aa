"""GLM-4.7's published chat template and its tokens.

``[gMASK]<sop>``, then ``<|system|>``/``<|user|>``/``<|assistant|>``/``<|observation|>`` turns with no
separators. An assistant turn opens with ``<think>reasoning</think>`` (kept only after the last user
turn; earlier reasoning is stripped) or a bare ``</think>``. The generation prompt ends in ``<think>``
when thinking is on (the default) and ``</think>`` when ``enable_thinking=False``. Tool calls are
``<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>``.

The template is the published file, shipped unchanged in ``chat_template.jinja`` (source and license in
its header); the tiny checkpoint carries it and the plugin falls back to it.
"""

from importlib.resources import files

PUBLISHED_SHA256 = "d63ad536c3c81880043e22ec7fd08db42b4d8fb7c89c7138bc562bfa25281375"
"""sha256 of the published template's bytes (checked by the tests)."""


def _published_template() -> str:
    text = files("inference_pio_glm_4_7_flash").joinpath("chat_template.jinja").read_text(encoding="utf-8")
    return text.split("-#}\n", 1)[1]  # the body after our header comment


CHAT_TEMPLATE = _published_template()

# Control tokens: roles, masks, modality markers. Never produced from user text.
CONTROL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
)
# Added tokens that are not special in the published tokenizer (kept by skip_special_tokens).
PLAIN_TOKENS = (
    "/nothink",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
)
SPECIAL_TOKENS = CONTROL_TOKENS + PLAIN_TOKENS  # every added token, in the published vocabulary's order
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")

"""GLM-4.7's chat template (our own Jinja, producing the model's published prompt format).

``[gMASK]<sop>``, then ``<|system|>``/``<|user|>``/``<|assistant|>``/``<|observation|>`` turns with no
separators. An assistant turn opens with ``<think>reasoning</think>`` (its own reasoning, kept only
after the last user turn) or a bare ``</think>``. The generation prompt ends in ``<think>`` when
thinking is on (the default) and ``</think>`` when ``enable_thinking=False``.
"""

CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m['content'] if m['content'] is string else "
    "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}"
    "{%- if m['role'] == 'system' -%}{{- '<|system|>' + content -}}"
    "{%- elif m['role'] == 'user' -%}{{- '<|user|>' + content -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<|assistant|>' -}}"
    "{%- if loop.index0 > ns.last_user and m.get('reasoning_content') -%}"
    "{{- '<think>' + m['reasoning_content'] + '</think>' -}}{%- else -%}{{- '</think>' -}}{%- endif -%}"
    "{{- content -}}"
    "{%- elif m['role'] == 'tool' -%}{{- '<|observation|><tool_response>' + content + '</tool_response>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}"
    "{{- '</think>' if (enable_thinking is defined and not enable_thinking) else '<think>' -}}{%- endif -%}"
)

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

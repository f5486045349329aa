"""logprobs through the plugin's Python API: one entry per shown token, the same streamed and not."""

from __future__ import annotations

from inference_pio_qwen3_vl_2b import Qwen3VL2BPlugin


def test_chat_logprobs_cover_every_shown_token_streamed_or_not(plugin: Qwen3VL2BPlugin) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    result = plugin.chat_completion(messages, max_new_tokens=12, logprobs=3, ignore_eos=True)
    assert [entry.token_id for entry in result.logprobs] == list(result.token_ids)
    for entry in result.logprobs:
        assert entry.logprob <= 0.0
        assert len(entry.top) == 3
        assert entry.top[0][2] >= entry.top[1][2] >= entry.top[2][2]
        assert entry.logprob <= entry.top[0][2] + 1e-6  # greedy picks the best one
        assert entry.token == plugin.tokenizer.decode([entry.token_id])
    streamed = [
        e
        for chunk in plugin.stream_chat(messages, max_new_tokens=12, logprobs=3, ignore_eos=True)
        for e in chunk.logprobs
    ]
    assert streamed == list(result.logprobs)
    assert plugin.chat_completion(messages, max_new_tokens=4).logprobs == ()

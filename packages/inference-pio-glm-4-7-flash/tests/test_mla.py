"""Absorbed MLA decode against transformers' own GLM attention on the same weights (tiny checkpoint, float32).

The reference is an untouched ``Glm4MoeLiteForCausalLM`` decoding with transformers' ``DynamicCache``;
ours is the runtime's ``DecodeEngine`` (static slot cache, 4-D masks over bucketed views, every slot
in one step) over a second copy of the model with the absorbed attention installed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteAttention

from inference_pio.runtime.contract import Prompt
from inference_pio.runtime.engine import DecodeEngine
from inference_pio.testing.fast_path import random_prompt, reference_greedy, switched_off
from inference_pio_glm_4_7_flash import Glm47FlashPlugin
from inference_pio_glm_4_7_flash.mla import AbsorbedMlaAttention, install_absorbed_mla, uninstall_absorbed_mla

STEPS = 64
ATOL = 1e-4
LENGTHS = (7, 40, 230)  # the 230-token row crosses the 256-position view bucket while decoding


def load(checkpoint: Path) -> Glm4MoeLiteForCausalLM:
    return Glm4MoeLiteForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Glm4MoeLiteForCausalLM:
    return load(checkpoint)


@pytest.fixture(scope="module")
def absorbed(checkpoint: Path) -> Glm4MoeLiteForCausalLM:
    model = load(checkpoint)
    assert install_absorbed_mla(model) == model.config.num_hidden_layers
    return model


def prompt_ids(length: int, seed: int) -> list[int]:
    return random_prompt(length, seed)


def transformers_greedy(model: Glm4MoeLiteForCausalLM, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Tokens and logits [STEPS, vocab] of STEPS greedy decode steps after the prompt, plain transformers."""
    return reference_greedy(model, ids, STEPS)


def engine_greedy(engine: DecodeEngine, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """The same through the runtime: one prefill per slot, then STEPS decode steps of all slots together."""
    tokens = []
    for slot, ids in enumerate(prompts):
        tokens.append([int(engine.prefill(slot, Prompt(ids))[-1].argmax())])
    with torch.inference_mode():
        engine.tokens[: len(prompts), 0] = torch.tensor([t[0] for t in tokens])
    steps = []
    for _ in range(STEPS):
        logits = engine.decode_step(list(range(len(prompts))))
        steps.append(logits)
        chosen = logits.argmax(-1)
        with torch.inference_mode():
            engine.tokens[:, 0] = chosen
        for row, token in zip(tokens, chosen.tolist(), strict=False):
            row.append(token)
    return tokens, torch.stack(steps, dim=1)  # [slots, STEPS, vocab]


def assert_matches_transformers(
    reference: Glm4MoeLiteForCausalLM, model: Glm4MoeLiteForCausalLM, lengths: tuple[int, ...], compile: bool = False
) -> None:
    prompts = [prompt_ids(n, seed=n) for n in lengths]
    engine = DecodeEngine(model, max_len=512, max_slots=len(prompts), compile=compile)
    engine.warm_up()
    ours, our_logits = engine_greedy(engine, prompts)
    for row, ids in enumerate(prompts):
        tokens, logits = transformers_greedy(reference, ids)
        error = (our_logits[row] - logits).abs().max().item()
        assert error < ATOL, f"row {row} ({len(ids)} prompt tokens): decode logits differ by {error:.2e}"
        assert ours[row] == tokens, f"row {row} ({len(ids)} prompt tokens): greedy tokens differ"


@pytest.mark.parametrize("fast", [True, False], ids=["absorbed", "expanded"])
def test_decode_matches_transformers_for_64_steps_alone(
    reference: Glm4MoeLiteForCausalLM, absorbed: Glm4MoeLiteForCausalLM, fast: bool
) -> None:
    assert_matches_transformers(reference, absorbed if fast else reference, (23,))


@pytest.mark.parametrize("fast", [True, False], ids=["absorbed", "expanded"])
def test_decode_matches_transformers_for_64_steps_with_rows_at_different_lengths(
    reference: Glm4MoeLiteForCausalLM, absorbed: Glm4MoeLiteForCausalLM, fast: bool
) -> None:
    assert_matches_transformers(reference, absorbed if fast else reference, LENGTHS)


def test_compiled_absorbed_decode_matches_transformers_with_rows_at_different_lengths(
    reference: Glm4MoeLiteForCausalLM, absorbed: Glm4MoeLiteForCausalLM
) -> None:
    assert_matches_transformers(reference, absorbed, (11, 230), compile=True)


def test_absorbed_decode_step_never_expands_the_cache(absorbed: Glm4MoeLiteForCausalLM) -> None:
    calls: list[int] = []
    hooks = [
        layer.self_attn.kv_b_proj.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[-2]))
        for layer in absorbed.model.layers
    ]
    try:
        engine = DecodeEngine(absorbed, max_len=512, max_slots=2)
        engine.prefill(0, Prompt(prompt_ids(30, seed=1)))
        assert len(calls) == absorbed.config.num_hidden_layers  # prefill keeps the expanded form
        calls.clear()
        for _ in range(3):
            engine.decode_step([0])
        assert calls == []
    finally:
        for hook in hooks:
            hook.remove()


def small_config(**overrides: object) -> Glm4MoeLiteConfig:
    values: dict[str, object] = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=16,
        v_head_dim=24,
        qk_nope_head_dim=32,
        initializer_range=0.1,
    )
    values.update(overrides)
    return Glm4MoeLiteConfig(**values)


@pytest.mark.parametrize(
    "overrides",
    [
        {"rope_interleave": False},
        {"q_lora_rank": None},
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 512,
                "mscale_all_dim": 1.0,
            }
        },
    ],
    ids=["rope-not-interleaved", "no-q-lora", "yarn-mscale"],
)
def test_absorbed_decode_matches_transformers_on_other_mla_variants(overrides: dict[str, object]) -> None:
    torch.manual_seed(0)
    reference = Glm4MoeLiteForCausalLM(small_config(**overrides)).eval()
    model = copy.deepcopy(reference)
    assert install_absorbed_mla(model) == 2
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    outputs = []
    with torch.inference_mode():
        for m in (reference, model):
            cache = DynamicCache(config=m.config)
            token = m(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(8):
                logits = m(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
                steps.append(logits)
                token = logits.argmax(-1, keepdim=True)
            outputs.append(torch.stack(steps))
    assert (outputs[0] - outputs[1]).abs().max().item() < ATOL


@pytest.mark.parametrize("weight", ["int8", "meta"])
def test_quantized_or_offloaded_kv_b_proj_keeps_the_expanded_path(weight: str) -> None:
    model = Glm4MoeLiteForCausalLM(small_config()).eval()
    attention = model.model.layers[0].self_attn
    shape = attention.kv_b_proj.weight.shape
    replaced = torch.zeros(shape, dtype=torch.int8) if weight == "int8" else torch.empty(shape, device="meta")
    attention.kv_b_proj.weight = torch.nn.Parameter(replaced, requires_grad=False)
    assert install_absorbed_mla(model) == 1
    assert type(attention) is Glm4MoeLiteAttention
    assert type(model.model.layers[1].self_attn) is AbsorbedMlaAttention
    assert uninstall_absorbed_mla(model) == 1
    assert type(model.model.layers[1].self_attn) is Glm4MoeLiteAttention


def attention_types(plugin: Glm47FlashPlugin) -> set[type]:
    return {type(layer.self_attn) for layer in plugin.model.model.layers}


def test_plugin_installs_absorbed_mla_by_default(plugin: Glm47FlashPlugin) -> None:
    assert attention_types(plugin) == {AbsorbedMlaAttention}


@pytest.mark.parametrize("how", ["keyword", "environment"])
def test_plugin_switch_turns_absorbed_mla_off(checkpoint: Path, tmp_path: Path, how: str) -> None:
    with switched_off("glm_4_7_flash", "mla_absorb", how, checkpoint, tmp_path) as plugin:
        assert isinstance(plugin, Glm47FlashPlugin)
        assert attention_types(plugin) == {Glm4MoeLiteAttention}
        assert plugin.generate_text("Hello", max_new_tokens=4).token_ids

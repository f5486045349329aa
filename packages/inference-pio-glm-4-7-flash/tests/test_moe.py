"""The fast MoE block against transformers' own GLM MoE on the same weights (float32, CPU).

Routing is compared exactly (same experts, same weights); block outputs and decode logits within 1e-4;
greedy tokens over 64 decode steps of the runtime's ``DecodeEngine`` (eager and compiled, rows joining
while others decode) identical to an untouched transformers model decoding each prompt alone. The
tiny checkpoint has one expert group and one shared expert; a variant with 4 groups (2 kept per
token), 2 shared experts and 16 experts covers the group-limited routing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteMoE

from inference_pio.runtime.contract import Prompt
from inference_pio.runtime.engine import DecodeEngine
from inference_pio.testing.fast_path import random_prompt, reference_greedy, switched_off
from inference_pio_glm_4_7_flash import Glm47FlashPlugin
from inference_pio_glm_4_7_flash.moe import (
    ExpertWeights,
    FastMoE,
    ParameterExperts,
    install_fast_moe,
    route,
    set_expert_weights,
    uninstall_fast_moe,
)

STEPS = 64
ATOL = 1e-4
PATHS = ["gather", "grouped"]


def load(checkpoint: Path) -> Glm4MoeLiteForCausalLM:
    return Glm4MoeLiteForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def with_bias(model: Glm4MoeLiteForCausalLM, seed: int = 5) -> Glm4MoeLiteForCausalLM:
    """A non-zero ``e_score_correction_bias`` (the published weights have one; the tiny init is zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(model):
            bias = block.gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.05)
    return model


def moe_blocks(model: torch.nn.Module) -> list[Any]:
    return [m for m in model.modules() if isinstance(m, Glm4MoeLiteMoE)]


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Glm4MoeLiteForCausalLM:
    return with_bias(load(checkpoint))


def variant_config() -> Glm4MoeLiteConfig:
    return Glm4MoeLiteConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=2.5,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        initializer_range=0.1,
    )


@pytest.fixture(scope="module")
def variant() -> Glm4MoeLiteForCausalLM:
    torch.manual_seed(1)
    return with_bias(Glm4MoeLiteForCausalLM(variant_config()).eval(), seed=7)


def fast_copy(model: Glm4MoeLiteForCausalLM, path: str) -> Glm4MoeLiteForCausalLM:
    fast = copy.deepcopy(model)
    assert install_fast_moe(fast, path=path) == len(moe_blocks(model)) > 0
    return fast


def test_the_tiny_checkpoint_has_a_shared_expert_and_the_variant_group_limited_routing(
    reference: Glm4MoeLiteForCausalLM, variant: Glm4MoeLiteForCausalLM
) -> None:
    assert reference.config.n_shared_experts >= 1 and reference.config.n_group == 1
    assert variant.config.n_group > variant.config.topk_group > 1 and variant.config.n_shared_experts > 1


@pytest.mark.parametrize("which", ["tiny", "variant", "not-normalized"])
def test_routing_picks_the_reference_experts_and_weights_exactly(
    reference: Glm4MoeLiteForCausalLM, variant: Glm4MoeLiteForCausalLM, which: str
) -> None:
    model = variant if which == "variant" else reference
    gate = moe_blocks(model)[0].gate
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(97, model.config.hidden_size, generator=generator)
    old = gate.norm_topk_prob
    gate.norm_topk_prob = which != "not-normalized"
    try:
        with torch.no_grad():
            _, ref_weights, ref_ids = gate(hidden)
            weights, ids = route(gate, hidden)
    finally:
        gate.norm_topk_prob = old
    assert torch.equal(ids, ref_ids)
    assert torch.equal(weights, ref_weights)


def test_routing_breaks_ties_as_the_reference() -> None:
    """Experts with identical router rows score identically: the same one of them must win."""
    config = variant_config()
    torch.manual_seed(2)
    block = Glm4MoeLiteMoE(config).eval()
    with torch.no_grad():
        block.gate.weight.normal_()
        block.gate.weight[1::2] = block.gate.weight[0::2]  # experts 2i and 2i+1 always tie
        block.gate.weight[4:8] = block.gate.weight[0:4]  # and whole groups tie too
    hidden = torch.randn(33, config.hidden_size)
    with torch.no_grad():
        _, ref_weights, ref_ids = block.gate(hidden)
        weights, ids = route(block.gate, hidden)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("which", ["tiny", "variant"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_block_output_matches_transformers(
    reference: Glm4MoeLiteForCausalLM, variant: Glm4MoeLiteForCausalLM, which: str, path: str, tokens: int
) -> None:
    model = variant if which == "variant" else reference
    block = moe_blocks(model)[-1]
    fast = copy.deepcopy(block)
    install_fast_moe(torch.nn.Sequential(fast), path=path)
    assert type(fast) is FastMoE
    hidden = torch.randn(tokens, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    default = model.config._experts_implementation
    try:
        for implementation in ("eager", default):  # transformers' per-expert loop, and what it runs by default
            model.config._experts_implementation = implementation
            with torch.no_grad():
                error = (fast(hidden) - block(hidden)).abs().max().item()
            assert error < ATOL, f"{error:.2e} from transformers' {implementation} experts"
    finally:
        model.config._experts_implementation = default


def test_compiled_group_limited_block_matches_transformers_without_graph_breaks(
    variant: Glm4MoeLiteForCausalLM,
) -> None:
    """``fullgraph=True`` fails on any host sync or data-dependent shape (``nonzero``, ``.tolist()``); both
    paths also compile inside the decode step below (one compile here: they cost a minute each on CPU)."""
    block = moe_blocks(variant)[-1]
    fast = copy.deepcopy(block)
    install_fast_moe(torch.nn.Sequential(fast), path="grouped")
    compiled = torch.compile(fast, fullgraph=True)
    hidden = torch.randn(8, 1, variant.config.hidden_size)
    with torch.no_grad():
        assert (compiled(hidden) - block(hidden)).abs().max().item() < ATOL
    torch._dynamo.reset()


@pytest.mark.parametrize("path", PATHS)
def test_prefill_logits_match_transformers(
    reference: Glm4MoeLiteForCausalLM, variant: Glm4MoeLiteForCausalLM, path: str
) -> None:
    for model in (reference, variant):
        fast = fast_copy(model, path)
        ids = torch.randint(0, 200, (3, 41), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            assert (fast(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item() < ATOL


# -- decode through the runtime --------------------------------------------------------------------------


def prompt_ids(length: int, seed: int) -> list[int]:
    return random_prompt(length, seed)


def transformers_greedy(model: Glm4MoeLiteForCausalLM, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Tokens and logits [STEPS, vocab] of STEPS greedy decode steps after the prompt, plain transformers."""
    return reference_greedy(model, ids, STEPS)


def engine_greedy(
    engine: DecodeEngine, prompts: list[list[int]], joins: list[int]
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Each prompt prefilled into its slot at decode step ``joins[i]`` (while earlier rows keep decoding),
    then greedy until it has STEPS decode steps; every step runs all slots."""
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    step = 0
    while any(len(row) < STEPS for row in logits):
        for slot, ids in enumerate(prompts):
            if joins[slot] == step:
                first = int(engine.prefill(slot, Prompt(ids))[-1].argmax())
                tokens[slot].append(first)
                with torch.inference_mode():
                    engine.tokens[slot, 0] = first
        active = [s for s in range(len(prompts)) if tokens[s] and len(logits[s]) < STEPS]
        out = engine.decode_step(active)
        chosen = out.argmax(-1)
        with torch.inference_mode():
            engine.tokens[:, 0] = chosen
        for slot in active:
            logits[slot].append(out[slot])
            tokens[slot].append(int(chosen[slot]))
            if len(logits[slot]) == STEPS:
                engine.release_slot(slot)
        step += 1
    return tokens, [torch.stack(row) for row in logits]


def assert_decode_matches_transformers(
    reference: Glm4MoeLiteForCausalLM, path: str, lengths: tuple[int, ...], joins: tuple[int, ...], compile: bool
) -> None:
    model = fast_copy(reference, path)
    prompts = [prompt_ids(n, seed=n) for n in lengths]
    engine = DecodeEngine(model, max_len=512, max_slots=len(prompts), compile=compile)
    engine.warm_up()
    ours, our_logits = engine_greedy(engine, prompts, list(joins))
    for row, ids in enumerate(prompts):
        tokens, logits = transformers_greedy(reference, ids)
        error = (our_logits[row] - logits).abs().max().item()
        assert error < ATOL, f"row {row} ({len(ids)} prompt tokens): decode logits differ by {error:.2e}"
        assert ours[row] == tokens, f"row {row} ({len(ids)} prompt tokens): greedy tokens differ"
    torch._dynamo.reset()


@pytest.mark.parametrize("path", PATHS)
def test_decode_matches_transformers_for_64_steps_alone(reference: Glm4MoeLiteForCausalLM, path: str) -> None:
    assert_decode_matches_transformers(reference, path, (23,), (0,), compile=False)


@pytest.mark.parametrize("path", PATHS)
def test_decode_matches_transformers_with_rows_joining(reference: Glm4MoeLiteForCausalLM, path: str) -> None:
    # the 230-token row crosses the 256-position view bucket while decoding; rows join at steps 0, 9 and 30
    assert_decode_matches_transformers(reference, path, (7, 230, 40), (0, 9, 30), compile=False)


@pytest.mark.parametrize("path", PATHS)
def test_compiled_decode_matches_transformers_with_rows_joining(reference: Glm4MoeLiteForCausalLM, path: str) -> None:
    assert_decode_matches_transformers(reference, path, (11, 230), (0, 5), compile=True)


# -- the expert store protocol ---------------------------------------------------------------------------


class CopyingStore:
    """A store that materializes what it is asked for (as a dequantizing store does), and counts it."""

    def __init__(self, experts: torch.nn.Module) -> None:
        self.inner = ParameterExperts(experts)
        self.materialized = 0

    @property
    def num_experts(self) -> int:
        return self.inner.num_experts

    def gate_up(self, ids: torch.Tensor) -> torch.Tensor:
        self.materialized += ids.shape[0]
        return self.inner.gate_up(ids).clone()

    def down(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.down(ids).clone()

    def gate_up_all(self) -> torch.Tensor:
        self.materialized += self.num_experts
        return self.inner.gate_up_all().clone()

    def down_all(self) -> torch.Tensor:
        return self.inner.down_all().clone()


def test_a_materializing_store_feeds_the_block_gathering_few_pairs_and_grouping_many(
    variant: Glm4MoeLiteForCausalLM,
) -> None:
    block = moe_blocks(variant)[-1]
    fast = copy.deepcopy(block)
    store = CopyingStore(fast.experts)
    assert isinstance(store, ExpertWeights)
    set_expert_weights(fast, store)
    install_fast_moe(torch.nn.Sequential(fast))
    assert fast.moe_store is store  # kept, not replaced by the parameters
    k, experts = variant.config.num_experts_per_tok, variant.config.n_routed_experts
    for tokens, materialized in ((1, k), (experts, experts)):  # 1 token: k gathered; E tokens: all E, once
        store.materialized = 0
        hidden = torch.randn(tokens, 1, variant.config.hidden_size)
        with torch.no_grad():
            assert (fast(hidden) - block(hidden)).abs().max().item() < ATOL
        assert store.materialized == materialized
    # a store must hold the block's routed experts, and only GLM MoE blocks take one
    with pytest.raises(ValueError, match="holds 8 experts, the block routes to 16"):
        set_expert_weights(fast, CopyingStore(moe_blocks(load_tiny_like())[0].experts))
    with pytest.raises(TypeError, match="not a GLM-4.7-Flash MoE block"):
        set_expert_weights(torch.nn.Linear(2, 2), store)
    # the fast block stays where transformers' block could not read the store
    assert uninstall_fast_moe(torch.nn.Sequential(fast)) == 0 and type(fast) is FastMoE


def load_tiny_like() -> Glm4MoeLiteForCausalLM:
    config = variant_config()
    config.n_routed_experts, config.num_local_experts, config.n_group, config.topk_group = 8, 8, 1, 1
    return Glm4MoeLiteForCausalLM(config)


# -- the switch ------------------------------------------------------------------------------------------


def test_install_and_uninstall_round_trip(variant: Glm4MoeLiteForCausalLM) -> None:
    model = copy.deepcopy(variant)
    blocks = moe_blocks(model)
    assert install_fast_moe(model) == len(blocks) == install_fast_moe(model)  # idempotent
    assert {type(b) for b in blocks} == {FastMoE}
    assert uninstall_fast_moe(model) == len(blocks)
    assert {type(b) for b in blocks} == {Glm4MoeLiteMoE}
    assert not any(hasattr(b, "moe_store") or "moe_path" in vars(b) for b in blocks)
    with pytest.raises(ValueError, match="not one of auto, gather, grouped"):
        install_fast_moe(model, path="dense")


@pytest.mark.parametrize("weight", ["int8", "meta"])
def test_quantized_or_offloaded_experts_keep_transformers_block(weight: str) -> None:
    model = load_tiny_like().eval()
    experts = moe_blocks(model)[0].experts
    shape = experts.gate_up_proj.shape
    replaced = torch.zeros(shape, dtype=torch.int8) if weight == "int8" else torch.empty(shape, device="meta")
    experts.gate_up_proj = torch.nn.Parameter(replaced, requires_grad=False)
    assert install_fast_moe(model) == 0
    assert type(moe_blocks(model)[0]) is Glm4MoeLiteMoE


def test_plugin_installs_the_fast_moe_by_default(plugin: Glm47FlashPlugin) -> None:
    assert {type(b) for b in moe_blocks(plugin.model)} == {FastMoE}


@pytest.mark.parametrize("how", ["keyword", "environment"])
def test_plugin_switch_gives_transformers_block_back(checkpoint: Path, tmp_path: Path, how: str) -> None:
    with switched_off("glm_4_7_flash", "moe_fast", how, checkpoint, tmp_path) as plugin:
        assert isinstance(plugin, Glm47FlashPlugin)
        blocks = moe_blocks(plugin.model)
        assert blocks and {type(b) for b in blocks} == {Glm4MoeLiteMoE}
        assert plugin.generate_text("Hello", max_new_tokens=4).token_ids

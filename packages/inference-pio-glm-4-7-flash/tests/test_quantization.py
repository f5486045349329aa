"""int8/int4 GLM-4.7-Flash on the CPU: the routed experts are quantized too (bitsandbytes alone leaves them in
float), the quantized model loads and generates through the runtime, and the stored values are within the
format's error bound of the checkpoint's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, Glm4MoeLiteForCausalLM
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteExperts

from inference_pio import PluginManager
from inference_pio.errors import ModelLoadError
from inference_pio.runtime.devices import loaded_weight_bytes
from inference_pio_glm_4_7_flash import Glm47FlashPlugin, quant
from inference_pio_glm_4_7_flash.testing import full_size_config

SCHEMES = ("int8", "int4")


@pytest.fixture(scope="module", params=SCHEMES)
def quantized(
    request: pytest.FixtureRequest, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Glm47FlashPlugin]:
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path_factory.mktemp("cfg") / "none.toml")})
    plugin = pm.activate_plugin(
        "glm_4_7_flash", device="cpu", model_path=str(checkpoint), max_context=256, quantization=request.param
    )
    assert isinstance(plugin, Glm47FlashPlugin)
    yield plugin
    pm.shutdown()


def reference_experts(checkpoint: Path) -> dict[tuple[int, int, str], torch.Tensor]:
    """(layer, expert, gate|up|down) -> the checkpoint's float weight."""
    found = {}
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            match = quant._EXPERT_KEY.search(key)
            if match is not None and match[2] is not None:
                found[int(match[1]), int(match[2]), match[3]] = handle.get_tensor(key)
    return found


def error_bound(store: quant.QuantizedExperts, part: str) -> torch.Tensor:
    """Half a quantization step per stored value (the largest rounding error), broadcast to (E, N, K)."""
    n, k = store._shapes()[part]
    scale = getattr(store, f"{part}_scale").float()
    if store.scheme == "int8":
        return (scale / 2).unsqueeze(-1).expand(-1, n, k)
    group = k // scale.shape[-1]
    return (scale / 2).repeat_interleave(group, dim=-1)


# -- the formats -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_dequantize_is_within_half_a_step(scheme: str) -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 48, 128) * 0.05
    weight[0, 0] = 0.0  # an all-zero row / group
    weight[1, 2, :64] = 0.25  # a constant group
    if scheme == "int8":
        codes, scale = quant.quantize_int8(weight)
        assert codes.dtype == torch.int8 and scale.shape == (3, 48)
        back = quant.dequantize_int8(codes, scale, torch.float32)
        step = scale.unsqueeze(-1)
        relative = 0.01
    else:
        packed, scale, low = quant.quantize_int4(weight, 64)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 48, 64) and scale.shape == (3, 48, 2)
        back = quant.dequantize_int4(packed, scale, low, torch.float32)
        step = scale.float().repeat_interleave(64, dim=-1)
        relative = 0.1
    error = (back - weight).abs()
    assert bool((error <= step / 2 * (1 + 1e-3) + 1e-7).all()), f"largest error {error.max().item():.3g}"
    assert error[0, 0].max().item() == 0.0 and error[1, 2, :64].max().item() < 1e-4
    assert ((back - weight).norm() / weight.norm()).item() < relative
    assert quant.dequantize_int8(*quant.quantize_int8(weight), torch.bfloat16).dtype == torch.bfloat16


def test_int4_groups_tile_the_input_dimension() -> None:
    assert [quant.int4_group_size(k) for k in (2048, 1536, 64, 32, 48)] == [64, 64, 64, 32, 16]
    with pytest.raises(ValueError, match="odd"):
        quant.int4_group_size(33)


def test_bitsandbytes_skips_what_it_cannot_quantize() -> None:
    tiny = AutoConfig.for_model(
        "glm4_moe_lite", q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16, hidden_size=64, n_shared_experts=1
    )
    skip = quant.bnb_skip_modules(tiny)  # 48 outputs: not 32-aligned
    assert sorted(skip) == ["kv_a_proj_with_mqa", "kv_b_proj", "lm_head", "q_a_proj"]
    assert quant.bnb_skip_modules(full_size_config()) == ["lm_head", "kv_b_proj"]


# -- the quantized model -----------------------------------------------------------------------------------


def test_quantized_model_loads_and_generates(quantized: Glm47FlashPlugin) -> None:
    plan = quantized.memory_plan
    assert plan is not None and plan.quantization in SCHEMES and plan.device == "cpu"
    result = quantized.generate_text("The quick brown fox", max_new_tokens=12)
    assert result.usage.completion_tokens == 12 and result.finish_reason == "length"
    chunks = list(quantized.stream_chat([{"role": "user", "content": "Hello"}], max_new_tokens=6))
    assert chunks and chunks[-1].finish_reason is not None
    blocks = [layer.mlp for layer in quantized.model.model.layers if hasattr(layer.mlp, "gate")]
    assert blocks and all(isinstance(getattr(b, "moe_store", None), quant.StoreView) for b in blocks)


def test_expert_values_are_stored_quantized(quantized: Glm47FlashPlugin) -> None:
    model = quantized.model
    config = model.config
    sparse = sum(1 for kind in config.mlp_layer_types if kind == "sparse")
    expected = sparse * config.n_routed_experts * 3 * config.moe_intermediate_size * config.hidden_size
    assert expected == 98_304  # the values bitsandbytes alone left in float32 (issue #10)
    values = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if ".mlp.experts." not in name:
            continue
        if tensor.is_floating_point():  # only the per-row / per-group scales stay in float
            assert name.endswith(("_scale", "_low")), f"{name} is a full-precision expert tensor"
        else:
            values += tensor.numel() * (2 if tensor.dtype == torch.uint8 else 1)
    assert values == expected
    assert not any(isinstance(m, Glm4MoeLiteExperts) for m in model.modules())
    linear8 = "Linear8bitLt" if quantized.memory_plan.quantization == "int8" else "Linear4bit"  # type: ignore[union-attr]
    attention = model.model.layers[1].self_attn
    assert type(attention.q_b_proj).__name__ == linear8 and type(attention.o_proj).__name__ == linear8
    assert type(attention.kv_b_proj) is torch.nn.Linear and attention.kv_b_proj.weight.is_floating_point()
    assert type(attention).__name__ == "AbsorbedMlaAttention"  # kv_b_proj kept in float: MLA stays absorbed


def test_memory_plan_matches_the_loaded_weight_bytes(quantized: Glm47FlashPlugin, plugin: Glm47FlashPlugin) -> None:
    """The plan counts the experts in their quantized format and what bitsandbytes keeps in float: within 1 %
    of what the loaded model measures (bitsandbytes alone left 98,304 float32 expert values the plan did not see)."""
    for loaded in (quantized, plugin):  # plugin: quantization none, float32
        plan = loaded.memory_plan
        assert plan is not None
        measured = loaded_weight_bytes(loaded.model)
        assert abs(plan.weight_bytes - measured) <= 0.01 * measured, (plan.quantization, plan.weight_bytes, measured)


def test_stored_experts_are_the_checkpoints_within_the_bound(quantized: Glm47FlashPlugin, checkpoint: Path) -> None:
    reference = reference_experts(checkpoint)
    stores = quant.quantized_stores(quantized.model)
    assert sorted(stores) == sorted({layer for layer, _, _ in reference})
    for layer, store in stores.items():
        experts = range(store.num_experts)
        gate_up = torch.stack([torch.cat([reference[layer, e, "gate"], reference[layer, e, "up"]]) for e in experts])
        down = torch.stack([reference[layer, e, "down"] for e in experts])
        for part, want, got in (("gate_up", gate_up, store.gate_up_all()), ("down", down, store.down_all())):
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert bool(((got - want).abs() <= error_bound(store, part) * (1 + 1e-3) + 1e-7).all()), (layer, part)
        ids = torch.tensor([3, 0, 3])
        assert torch.equal(store.gate_up(ids), store.gate_up_all()[ids])
        assert torch.equal(store.down(ids), store.down_all()[ids])


def test_gathered_dequantization_compiles_without_graph_breaks(quantized: Glm47FlashPlugin) -> None:
    store = next(iter(quant.quantized_stores(quantized.model).values()))
    x = torch.randn(4, store.hidden_dim)

    def step(ids: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(store.gate_up(ids), x.unsqueeze(-1)).squeeze(-1)
        return torch.bmm(store.down(ids), h[:, : store.intermediate_dim].unsqueeze(-1)).squeeze(-1)

    ids = torch.tensor([1, 7, 7, 0])
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(ids), step(ids), rtol=1e-5, atol=1e-5)


def test_quantization_none_keeps_transformers_experts(plugin: Glm47FlashPlugin) -> None:
    assert plugin.memory_plan is not None and plugin.memory_plan.quantization == "none"
    assert type(plugin.model) is Glm4MoeLiteForCausalLM
    assert not quant.quantized_stores(plugin.model)
    assert any(isinstance(m, Glm4MoeLiteExperts) for m in plugin.model.modules())


# -- streaming ---------------------------------------------------------------------------------------------


def test_streaming_reads_fused_expert_keys_and_names_missing_experts(checkpoint: Path, tmp_path: Path) -> None:
    reference = Glm4MoeLiteForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = reference.config
    fused = {
        f"model.layers.{i}.mlp.experts.{name}": getattr(layer.mlp.experts, name).detach().contiguous()
        for i, layer in enumerate(reference.model.layers)
        if hasattr(layer.mlp, "experts")
        for name in ("gate_up_proj", "down_proj")
    }
    save_file(fused, str(tmp_path / "fused.safetensors"))
    from_fused = quant._Int4ExpertsGlm(config)
    assert quant.stream_experts(from_fused, [tmp_path / "fused.safetensors"], torch.float32) == 2 * 2 * 8
    from_split = quant._Int4ExpertsGlm(config)
    quant.stream_experts(from_split, [checkpoint / "model.safetensors"], torch.float32)
    for layer, store in quant.quantized_stores(from_fused).items():
        other = quant.quantized_stores(from_split)[layer]
        assert torch.equal(store.gate_up_all(), other.gate_up_all()) and torch.equal(store.down_all(), other.down_all())

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        partial = {k: handle.get_tensor(k) for k in handle.keys() if k != "model.layers.2.mlp.experts.5.up_proj.weight"}  # noqa: SIM118
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelLoadError, match=r"layer 2: 5\.up_proj"):
        quant.stream_experts(quant._Int8ExpertsGlm(config), [tmp_path / "partial.safetensors"], torch.float32)


def test_transformers_block_computes_the_quantized_experts_as_the_fast_moe(quantized: Glm47FlashPlugin) -> None:
    from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteMoE

    block = quantized.model.model.layers[1].mlp
    hidden = torch.randn(2, 5, quantized.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fast = block(hidden)  # the fast MoE, reading the store through StoreView
        reference = Glm4MoeLiteMoE.forward(block, hidden)  # transformers' block: QuantizedExperts.forward
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_the_published_models_quantized_requirements_are_what_the_plan_computes(tmp_path: Path) -> None:
    """The metadata figures (used for a hub id, before any checkpoint is on disk) against the plan's own
    computation on the full-size architecture built on the meta device: quantized experts included."""
    from inference_pio_glm_4_7_flash.metadata import METADATA

    full_size_config().save_pretrained(tmp_path)
    sizes = Glm47FlashPlugin().weight_sizes(tmp_path)
    assert sizes.parameters == METADATA.parameter_count
    for quantization in ("int8", "int4"):
        planned = sizes.bytes_for("bfloat16", quantization)
        assert abs(METADATA.memory_requirements[quantization] - planned) <= 0.01 * planned  # type: ignore[index]
    assert METADATA.memory_requirements["bfloat16"] == sizes.bytes_for("bfloat16", "none")

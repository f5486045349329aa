"""8-bit and 4-bit routed experts for GLM-4.7-Flash, loaded without a full-precision copy.

Why: transformers' bitsandbytes integration replaces ``nn.Linear`` modules only. GLM-4.7-Flash's routed
experts are fused 3-D parameters (``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj``
(E, H, I)): about 27.8 B of its 29.9 B parameters stayed in bf16, so a "4-bit" load needed ~57 GB.

Method: a weight-only store in plain torch, chosen over bitsandbytes' functional 4/8-bit per expert and
over other libraries because

* the decode step runs under ``torch.compile(fullgraph=True)`` and CUDA graphs: dequantizing the
  gathered experts here is a handful of elementwise ops on static shapes (``index_select``, a nibble
  unpack, one multiply-add) that inductor fuses into one kernel, with no host sync and no opaque
  per-call Python state (bitsandbytes' ``QuantState`` objects, its separate kernel launches per tensor);
* gathering experts by id is a plain ``index_select`` on the packed storage, which is exactly what
  the MoE kernel's :class:`~inference_pio_glm_4_7_flash.moe.ExpertWeights` protocol asks for;
* the same code runs on CUDA and on the CPU (tests, CI), with no extra dependency; torchao's MoE
  quantization is a prototype with its own tensor subclasses, pinned to torch versions.

Formats (rows are output channels, K the input dimension):

* ``int8``: symmetric per output row, ``w ~ q * scale`` with q in [-127, 127] and a float32 scale per
  row: 1 byte per weight plus 4 bytes per row (~1.002 B/weight at GLM's sizes).
* ``int4``: asymmetric groups of :data:`INT4_GROUP` along K, ``w ~ q * scale + low`` with q in [0, 15],
  two codes per byte (even k in the low nibble), float16 scale and low per group: 0.5625 B/weight. The
  scale and low are rounded to float16 before the codes are chosen, so the codes fit the stored values.

Dequantization computes in float32 and casts to the model's dtype once.

Loading (:func:`load_quantized`): the model class is a subclass whose MoE blocks hold an empty
:class:`QuantizedExperts` instead of transformers' experts, so ``from_pretrained`` never allocates the
experts (their checkpoint keys are ignored) and quantizes the ``nn.Linear`` layers with bitsandbytes.
Then the experts are streamed from the checkpoint's safetensors files one expert matrix at a time,
quantized on the target device and written into preallocated quantized storage: the peak stays near
the quantized size plus one expert in float32.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteForCausalLM, Glm4MoeLiteMoE

from inference_pio.errors import ModelLoadError

log = logging.getLogger("inference_pio.glm_4_7_flash")

Scheme = Literal["int8", "int4"]
SCHEMES: tuple[str, ...] = ("int8", "int4")
INT4_GROUP = 64
"""Weights per int4 scale/low pair along K (GLM-4.7-Flash's K are 2048 and 1536, multiples of it)."""
BNB_CPU_BLOCK_N = 32
"""bitsandbytes' CPU 4-bit kernel (CPUs with AVX512-BF16) packs 32 output rows per block and asserts
``out_features % 32 == 0`` ("N must be divisible by block_n"); such layers stay unquantized."""

_EXPERT_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.mlp\.experts\.(?:(\d+)\.(gate|up|down)_proj\.weight|(gate_up_proj|down_proj))$"
)


# -- quantize / dequantize ------------------------------------------------------------------------------


def int4_group_size(k: int) -> int:
    """The int4 group length for input dimension ``k``: :data:`INT4_GROUP`, or the largest power of two
    below it that divides ``k`` (tiny test models); ``k`` must be even (two codes per byte)."""
    if k % 2:
        raise ValueError(f"int4 packs two weights per byte; the input dimension {k} is odd")
    group = INT4_GROUP
    while k % group:
        group //= 2
    return group


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (..., N, K) -> codes int8 (..., N, K) and float32 scales (..., N), symmetric per row."""
    w = weight.float()
    scale = w.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale gives zeros
    codes = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`, in ``dtype``."""
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` (..., N, K) -> packed codes uint8 (..., N, K/2), float16 scale and low (..., N, K/group)."""
    *lead, n, k = weight.shape
    if k % group or group % 2:
        raise ValueError(f"int4 groups of {group} do not tile the input dimension {k}")
    w = weight.float().reshape(*lead, n, k // group, group)
    low = w.amin(dim=-1).half()
    scale = ((w.amax(dim=-1) - low.float()) / 15.0).half()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((w - low.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    codes = codes.reshape(*lead, n, k)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, scale, low


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_int4`, in ``dtype`` (shapes are static: fine under ``fullgraph`` capture)."""
    *lead, n, half = packed.shape
    groups = scale.shape[-1]
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*lead, n, groups, (2 * half) // groups)
    w = codes.float() * scale.float().unsqueeze(-1) + low.float().unsqueeze(-1)
    return w.reshape(*lead, n, 2 * half).to(dtype)


# -- the store -----------------------------------------------------------------------------------------


class QuantizedExperts(torch.nn.Module):  # type: ignore[misc]  # torch is not type-checked here
    """A MoE block's routed experts held as int8 or int4 codes; hands out dequantized matrices.

    Implements :class:`~inference_pio_glm_4_7_flash.moe.ExpertWeights` (``num_experts``, ``gate_up``,
    ``down``, ``gate_up_all``, ``down_all``) in the layout of transformers' fused experts, and
    transformers' experts ``forward(hidden_states, top_k_index, top_k_weights)``, so the block computes
    with or without the fast MoE. Storage is allocated by :meth:`allocate` (after ``from_pretrained``,
    which must not see it) and filled per expert by :meth:`put`.
    """

    def __init__(self, config: Any, scheme: str, act_fn: Any) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"expert quantization must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        self.scheme = scheme
        self.experts = int(config.n_routed_experts)
        self.hidden_dim = int(config.hidden_size)
        self.intermediate_dim = int(config.moe_intermediate_size)
        self.act_fn = act_fn
        self.compute_dtype = torch.float32
        self.loaded: torch.Tensor | None = None  # (E, 3) bool on the CPU: gate, up, down rows written

    @property
    def num_experts(self) -> int:
        return self.experts

    def _shapes(self) -> dict[str, tuple[int, int]]:
        return {
            "gate_up": (2 * self.intermediate_dim, self.hidden_dim),
            "down": (self.hidden_dim, self.intermediate_dim),
        }

    def allocate(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Create the (uninitialized) quantized storage on ``device``; ``dtype`` is what :meth:`gate_up` returns."""
        self.compute_dtype = dtype
        e = self.experts
        for part, (n, k) in self._shapes().items():
            if self.scheme == "int8":
                self.register_buffer(f"{part}_codes", torch.empty(e, n, k, dtype=torch.int8, device=device))
                self.register_buffer(f"{part}_scale", torch.empty(e, n, dtype=torch.float32, device=device))
            else:
                groups = k // int4_group_size(k)
                self.register_buffer(f"{part}_codes", torch.empty(e, n, k // 2, dtype=torch.uint8, device=device))
                self.register_buffer(f"{part}_scale", torch.empty(e, n, groups, dtype=torch.float16, device=device))
                self.register_buffer(f"{part}_low", torch.empty(e, n, groups, dtype=torch.float16, device=device))
        self.loaded = torch.zeros(e, 3, dtype=torch.bool)

    def put(self, expert: int, projection: str, weight: torch.Tensor) -> None:
        """Quantize one expert's ``gate``/``up``/``down`` (N, K) or fused ``gate_up`` (2I, H) into the store."""
        if self.loaded is None:
            raise RuntimeError("QuantizedExperts.put before allocate()")
        if not 0 <= expert < self.experts:
            raise ValueError(f"expert {expert} is out of range: the block has {self.experts} routed experts")
        i = self.intermediate_dim
        part, rows, done = {
            "gate": ("gate_up", slice(0, i), (0,)),
            "up": ("gate_up", slice(i, 2 * i), (1,)),
            "gate_up": ("gate_up", slice(0, 2 * i), (0, 1)),
            "down": ("down", slice(None), (2,)),
        }[projection]
        n, k = self._shapes()[part]
        want = (rows.stop - rows.start if rows.stop is not None else n, k)
        if tuple(weight.shape) != want:
            raise ModelLoadError(
                f"expert {expert} {projection}_proj has shape {tuple(weight.shape)}, expected {want} "
                f"(hidden_size {self.hidden_dim}, moe_intermediate_size {i}): checkpoint and config disagree"
            )
        codes: torch.Tensor = getattr(self, f"{part}_codes")
        weight = weight.to(codes.device)
        with torch.no_grad():
            if self.scheme == "int8":
                q, scale = quantize_int8(weight)
                codes[expert, rows] = q
                getattr(self, f"{part}_scale")[expert, rows] = scale
            else:
                q, scale, low = quantize_int4(weight, int4_group_size(k))
                codes[expert, rows] = q
                getattr(self, f"{part}_scale")[expert, rows] = scale
                getattr(self, f"{part}_low")[expert, rows] = low
        for column in done:
            self.loaded[expert, column] = True

    def missing(self) -> list[str]:
        """What :meth:`put` has not written yet, e.g. ``["3.up_proj"]``."""
        if self.loaded is None:
            return ["all (not allocated)"]
        names = ("gate_proj", "up_proj", "down_proj")
        return [f"{e}.{names[c]}" for e, c in (~self.loaded).nonzero().tolist()]

    def _dequantize(self, part: str, ids: torch.Tensor | None) -> torch.Tensor:
        def pick(name: str) -> torch.Tensor:
            tensor: torch.Tensor = getattr(self, f"{part}_{name}")
            return tensor if ids is None else tensor.index_select(0, ids)

        if self.scheme == "int8":
            return dequantize_int8(pick("codes"), pick("scale"), self.compute_dtype)
        return dequantize_int4(pick("codes"), pick("scale"), pick("low"), self.compute_dtype)

    def gate_up(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, 2I, H) in the compute dtype for expert ids ``ids`` (n,); only those are dequantized."""
        return self._dequantize("gate_up", ids)

    def down(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, H, I) in the compute dtype for expert ids ``ids`` (n,)."""
        return self._dequantize("down", ids)

    def gate_up_all(self) -> torch.Tensor:
        return self._dequantize("gate_up", None)

    def down_all(self) -> torch.Tensor:
        return self._dequantize("down", None)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers' experts call (used where the fast MoE is off): each (token, expert) pair's weights
        gathered and dequantized, one batched matrix-vector product per projection (static shapes)."""
        tokens, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        x = hidden_states.to(self.compute_dtype)
        xs = x.unsqueeze(1).expand(tokens, k, x.shape[-1]).reshape(tokens * k, x.shape[-1], 1)
        gate, up = torch.bmm(self.gate_up(flat), xs).squeeze(-1).chunk(2, dim=-1)
        y = torch.bmm(self.down(flat), (self.act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)
        out = (y.view(tokens, k, -1).float() * top_k_weights.unsqueeze(-1).float()).sum(dim=1)
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{self.scheme}, experts={self.experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"


def expert_bytes(config: Any, scheme: str) -> int:
    """Bytes of every routed expert of a GLM config in ``scheme`` (what :class:`QuantizedExperts` allocates)."""
    e, h, i = int(config.n_routed_experts), int(config.hidden_size), int(config.moe_intermediate_size)
    sparse = sum(1 for kind in _layer_kinds(config) if kind == "sparse")
    per_layer = 0
    for name, shape in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
        sizes = expert_parameter_bytes(f"mlp.experts.{name}", shape)
        assert sizes is not None
        per_layer += sizes[scheme]
    return sparse * per_layer


def expert_parameter_bytes(name: str, shape: tuple[int, ...]) -> dict[str, int] | None:
    """Bytes :class:`QuantizedExperts` stores for a fused expert parameter of the model (``gate_up_proj``
    (E, 2I, H) or ``down_proj`` (E, H, I)) per scheme; None for every other parameter. For the memory plan."""
    if not re.search(r"(?:^|\.)mlp\.experts\.(gate_up_proj|down_proj)$", name) or len(shape) != 3:
        return None
    e, n, k = shape
    return {"int8": e * n * (k + 4), "int4": e * n * (k // 2 + 4 * (k // int4_group_size(k)))}


def _layer_kinds(config: Any) -> list[str]:
    kinds = getattr(config, "mlp_layer_types", None)
    if kinds:
        return list(kinds)
    first = int(getattr(config, "first_k_dense_replace", 1))
    return ["dense" if n < first else "sparse" for n in range(int(config.num_hidden_layers))]


# -- loading -------------------------------------------------------------------------------------------


class _ExpertQuantizedGlm(Glm4MoeLiteForCausalLM):  # type: ignore[misc]  # transformers is untyped here
    """``Glm4MoeLiteForCausalLM`` whose MoE blocks hold empty :class:`QuantizedExperts`: ``from_pretrained``
    allocates no expert weights and ignores the experts' checkpoint keys (they are streamed afterwards)."""

    expert_scheme: ClassVar[str] = "int4"
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [
        *(Glm4MoeLiteForCausalLM._keys_to_ignore_on_load_unexpected or []),
        r"\.mlp\.experts\.",
    ]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            if isinstance(layer.mlp, Glm4MoeLiteMoE):
                layer.mlp.experts = QuantizedExperts(config, self.expert_scheme, layer.mlp.experts.act_fn)


class _Int8ExpertsGlm(_ExpertQuantizedGlm):
    expert_scheme = "int8"


class _Int4ExpertsGlm(_ExpertQuantizedGlm):
    expert_scheme = "int4"


def quantized_stores(model: torch.nn.Module) -> dict[int, QuantizedExperts]:
    """Layer index -> the :class:`QuantizedExperts` of that layer's MoE block."""
    stores = {}
    for index, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, QuantizedExperts):
            stores[index] = experts
    return stores


def checkpoint_files(source: str, revision: str | None = None, local_files_only: bool = False) -> list[Path]:
    """The safetensors files of ``source`` (a directory, or a hub id already fetched by ``from_pretrained``)."""
    directory = Path(source)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(
            snapshot_download(
                source,
                revision=revision,
                allow_patterns=["*.safetensors", "*.safetensors.index.json"],
                local_files_only=local_files_only,
            )
        )
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / name for name in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {directory}; quantized experts are read from safetensors")
    return files


def stream_experts(model: torch.nn.Module, files: Iterable[Path], dtype: torch.dtype) -> int:
    """Allocate every MoE block's quantized store on its block's device and fill it from ``files``, one
    expert matrix at a time (read onto that device, quantized there, freed); returns how many were read.

    Per-expert checkpoint keys (``...mlp.experts.<e>.gate_proj.weight``, the published layout) and fused
    ones (``...mlp.experts.gate_up_proj``, read one expert slice at a time) are both understood. Keys of
    layers the model does not have (GLM's multi-token-prediction layer) are skipped.
    """
    from safetensors import safe_open

    stores = quantized_stores(model)
    devices = {}
    for layer, store in stores.items():
        devices[layer] = model.model.layers[layer].mlp.gate.weight.device  # a split model: each block's own
        store.allocate(devices[layer], dtype)
    count = 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118  # a safetensors handle is not iterable
                match = _EXPERT_KEY.search(key)
                if match is None or int(match[1]) not in stores:
                    continue
                store, device = stores[int(match[1])], devices[int(match[1])]
                if match[2] is not None:
                    store.put(int(match[2]), match[3], handle.get_tensor(key).to(device))
                    count += 1
                    continue
                piece = handle.get_slice(key)
                projection = "gate_up" if match[4] == "gate_up_proj" else "down"
                for expert in range(int(piece.get_shape()[0])):
                    store.put(expert, projection, piece[expert].to(device))
                    count += 1
    gaps = {layer: store.missing() for layer, store in stores.items() if store.missing()}
    if gaps:
        shown = "; ".join(f"layer {layer}: {', '.join(names[:4])}" for layer, names in list(gaps.items())[:4])
        raise ModelLoadError(
            f"the checkpoint lacks routed-expert weights for {len(gaps)} MoE layer(s) ({shown}); "
            "is it a complete GLM-4.7-Flash checkpoint?"
        )
    return count


def bnb_skip_modules(config: Any) -> list[str]:
    """Modules bitsandbytes must leave in full precision for GLM (``llm_int8_skip_modules``; the memory plan
    counts the same, see ``Glm47FlashPlugin.weight_sizes``).

    ``lm_head`` (transformers' default), ``kv_b_proj`` (its input is 4-D, which bitsandbytes' CPU int8 path
    rejects with a shape error, and absorbed MLA needs its per-head blocks in float), and every linear layer
    whose output size is not a multiple of :data:`BNB_CPU_BLOCK_N` (bitsandbytes' CPU 4-bit kernel). The
    last rule holds on every device and scheme so that plan and load agree everywhere; GLM-4.7-Flash's own
    layers are all aligned, so it only keeps small test models' odd layers in float.
    """
    skip = ["lm_head", "kv_b_proj"]
    outputs = {
        "q_a_proj": config.q_lora_rank,
        "q_b_proj": config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim),
        "q_proj": config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim),
        "kv_a_proj_with_mqa": config.kv_lora_rank + config.qk_rope_head_dim,
        "o_proj": config.hidden_size,
        "shared_experts.gate_proj": config.moe_intermediate_size * config.n_shared_experts,
        "shared_experts.up_proj": config.moe_intermediate_size * config.n_shared_experts,
        "shared_experts.down_proj": config.hidden_size,
        "mlp.gate_proj": config.intermediate_size,
        "mlp.up_proj": config.intermediate_size,
        "mlp.down_proj": config.hidden_size,
    }
    skip += [name for name, size in outputs.items() if size is not None and int(size) % BNB_CPU_BLOCK_N]
    return skip


def load_quantized(source: str, kwargs: Mapping[str, Any], scheme: str) -> Any:
    """``from_pretrained`` for GLM with ``scheme`` weights everywhere: bitsandbytes for the linear layers
    (``kwargs["quantization_config"]``, adjusted), :class:`QuantizedExperts` for the routed experts."""
    import transformers

    if scheme not in SCHEMES:
        raise ValueError(f"expert quantization must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    kwargs = dict(kwargs)
    config = transformers.AutoConfig.from_pretrained(
        source, revision=kwargs.get("revision"), local_files_only=bool(kwargs.get("local_files_only"))
    )
    bnb = kwargs.get("quantization_config")
    if bnb is not None:
        skip = {*(bnb.llm_int8_skip_modules or []), *bnb_skip_modules(config)}
        bnb.llm_int8_skip_modules = sorted(skip)
    cls = _Int8ExpertsGlm if scheme == "int8" else _Int4ExpertsGlm
    model = cls.from_pretrained(source, **kwargs)
    dtype = kwargs.get("dtype") or torch.float32
    files = checkpoint_files(source, kwargs.get("revision"), bool(kwargs.get("local_files_only")))
    count = stream_experts(model, files, dtype)
    log.info("routed experts: %d matrices quantized to %s", count, scheme)
    _attach_stores(model)
    return model


def _attach_stores(model: torch.nn.Module) -> None:
    """Point each MoE block's fast path at its quantized store (see :func:`moe.set_expert_weights`); with the
    fast MoE switched off, transformers' block calls :meth:`QuantizedExperts.forward` instead."""
    from inference_pio_glm_4_7_flash import moe

    for layer in model.model.layers:
        if isinstance(layer.mlp, Glm4MoeLiteMoE) and isinstance(layer.mlp.experts, QuantizedExperts):
            moe.set_expert_weights(layer.mlp, StoreView(layer.mlp.experts))


class StoreView:
    """The :class:`ExpertWeights` handed to the fast MoE: delegates to a block's :class:`QuantizedExperts`
    (a plain object, so the module is not registered a second time under the block)."""

    def __init__(self, experts: QuantizedExperts) -> None:
        self.experts = experts

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def gate_up(self, ids: torch.Tensor) -> torch.Tensor:
        return self.experts.gate_up(ids)

    def down(self, ids: torch.Tensor) -> torch.Tensor:
        return self.experts.down(ids)

    def gate_up_all(self) -> torch.Tensor:
        return self.experts.gate_up_all()

    def down_all(self) -> torch.Tensor:
        return self.experts.down_all()

"""GLM-4.7-Flash's routed-expert MoE block as one graph-capturable computation.

transformers' ``Glm4MoeLiteMoE`` routes with sigmoid scores (plus ``e_score_correction_bias`` for the
choice only), optional group-limited top-k, ``norm_topk_prob`` and ``routed_scaling_factor``; its
experts are fused 3-D parameters ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), and a shared
expert (a plain MLP) is added to every token. Its eager experts loop over the experts present
(``nonzero`` then one Python iteration each): a host sync and data-dependent shapes in every step.

:class:`FastMoE` keeps the routing math of the reference op for op (same tensors into the same
``topk`` calls, so the same experts win, ties included) and computes the experts in one of two
static-shape ways:

* ``gather``: the selected experts' weights are gathered into (T*k, ...) and multiplied as a batched
  GEMV. Costs a copy of T*k experts per step, so it pays only for few tokens; it is the path a
  quantized store wants at decode (it dequantizes only the selected experts).
* ``grouped``: (token, expert) pairs sorted by expert, per-expert offsets from ``searchsorted`` (no
  ``bincount``/``nonzero``), and one grouped GEMM per projection (``torch.nn.functional.grouped_mm``;
  CUTLASS on CUDA bf16, a native kernel on CPU). Each used expert is read once, no weight is copied.

Neither has a host sync, so both compile with ``fullgraph=True`` and are captured as CUDA graphs.
Plain weights take ``grouped`` wherever ``grouped_mm`` has a kernel (:meth:`FastMoE.choose_path` says why).

The shared expert stays transformers' own MLP beside the routed computation. Fusing it as an extra,
always-selected expert would save its three GEMM launches per layer (a few percent of a GPU decode
step), but a grouped GEMM takes one (G, K, N) weight tensor: the shared expert's weights would have to
live in the same allocation as the routed ones, i.e. re-laying out the model's parameters as views
(which ``save_pretrained`` refuses as shared tensors and a later ``.to()`` silently duplicates) or
copying the experts; and a quantized store keeps the shared expert as ``nn.Linear`` layers anyway.

Expert weights are reached through :class:`ExpertWeights`, so a quantized store can feed the same
computation (it dequantizes what the step asks for); :class:`ParameterExperts` wraps the model's own
parameters.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteMoE

log = logging.getLogger("inference_pio.glm_4_7_flash")

Path = Literal["auto", "gather", "grouped"]
PATHS: tuple[str, ...] = ("auto", "gather", "grouped")


@runtime_checkable
class ExpertWeights(Protocol):
    """Where the MoE computation gets its expert matrices, in the compute dtype, on the compute device.

    A store may hold anything (the model's parameters, int8/int4 with scales) as long as it hands out
    dense matrices in the layout of transformers' fused experts: ``gate_up`` rows are the gate
    projection's I rows then the up projection's I rows.
    """

    @property
    def num_experts(self) -> int:
        """How many experts the store holds (valid ids are ``0 .. num_experts - 1``)."""
        ...

    def gate_up(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, 2I, H) for the expert ids ``ids`` (n,), repeats allowed, in the order given."""
        ...

    def down(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, H, I) for the expert ids ``ids`` (n,)."""
        ...

    def gate_up_all(self) -> torch.Tensor:
        """(num_experts, 2I, H): every expert."""
        ...

    def down_all(self) -> torch.Tensor:
        """(num_experts, H, I): every expert."""
        ...


class ParameterExperts:
    """:class:`ExpertWeights` over a ``Glm4MoeLiteExperts`` module's own parameters (no copy held).

    The parameters are read at each call, so moving the model to another device or dtype is seen.
    """

    def __init__(self, experts: torch.nn.Module) -> None:
        self.experts = experts

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    def gate_up(self, ids: torch.Tensor) -> torch.Tensor:
        return self.experts.gate_up_proj.index_select(0, ids)

    def down(self, ids: torch.Tensor) -> torch.Tensor:
        return self.experts.down_proj.index_select(0, ids)

    def gate_up_all(self) -> torch.Tensor:
        weight: torch.Tensor = self.experts.gate_up_proj
        return weight

    def down_all(self) -> torch.Tensor:
        weight: torch.Tensor = self.experts.down_proj
        return weight


def route(gate: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (T, k) float32 and expert ids (T, k) for ``hidden`` (T, H), as ``Glm4MoeLiteTopkRouter``.

    The same ops in the same order on the same shapes; the group-limited stage is skipped only where it
    cannot mask anything (``topk_group >= n_group``: every group is kept), which leaves the values the
    final ``topk`` sees unchanged.
    """
    experts, groups, keep = int(gate.num_experts), int(gate.num_group), int(gate.topk_group)
    logits = F.linear(hidden.type(torch.float32), gate.weight.type(torch.float32))
    scores = logits.sigmoid()
    choice = scores + gate.e_score_correction_bias
    if keep < groups:
        group_scores = choice.view(-1, groups, experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=keep, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, experts // groups).reshape(-1, experts)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=int(gate.top_k), dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * gate.routed_scaling_factor, ids


# -- grouped GEMM ------------------------------------------------------------------------------------


@torch.library.custom_op("inference_pio_glm::grouped_mm", mutates_args=())  # type: ignore[untyped-decorator]
def _grouped_mm_opaque(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The eager grouped GEMM as one opaque op: inductor lowers ``grouped_mm`` for bf16 only, and the
    eager kernel takes every float dtype (CPU float32, the fidelity tests' dtype)."""
    return _grouped_mm_kernel(x, weight, offs)


@_grouped_mm_opaque.register_fake  # type: ignore[untyped-decorator]
def _(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[-1]))


def _grouped_mm_kernel(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, weight, offs=offs)  # type: ignore[no-any-return]
    return torch._grouped_mm(x, weight, offs=offs)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`grouped_mm` has a kernel for ``device``/``dtype`` (CPU: any float; CUDA: bf16 on sm80+)."""
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if device.type == "cpu":
        return bool(dtype.is_floating_point)
    if device.type == "cuda":
        return bool(dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0))
    return False


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x`` (S, K) rows sorted by group times ``weight`` (G, K, N), group g owning rows ``offs[g-1]:offs[g]``."""
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return _grouped_mm_opaque(x, weight, offs)  # type: ignore[no-any-return]
    return _grouped_mm_kernel(x, weight, offs)


# -- the two expert computations ------------------------------------------------------------------------


def experts_gather(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, store: ExpertWeights, act: Any
) -> torch.Tensor:
    """Routed output (T, H) float32: each (token, expert) pair's weights gathered, one batched GEMV each.

    Tokens go in chunks of at most ``num_experts // k`` (a static loop) so that no more than about one
    layer's worth of experts is materialized at once, whatever T a prefill brings.
    """
    tokens, k = ids.shape
    chunk = max(1, store.num_experts // k)
    parts = []
    for start in range(0, tokens, chunk):
        part_ids = ids[start : start + chunk]
        count = part_ids.shape[0]
        flat = part_ids.reshape(-1)
        xs = x[start : start + chunk].unsqueeze(1).expand(count, k, x.shape[-1]).reshape(count * k, -1, 1)
        h = torch.bmm(store.gate_up(flat), xs).squeeze(-1)  # (P, 2I)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(store.down(flat), (act(gate) * up).unsqueeze(-1)).squeeze(-1)  # (P, H)
        parts.append((y.view(count, k, -1).float() * weights[start : start + chunk].unsqueeze(-1)).sum(dim=1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def experts_grouped(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, store: ExpertWeights, act: Any
) -> torch.Tensor:
    """Routed output (T, H) float32: pairs sorted by expert, one grouped GEMM per projection."""
    tokens, k = ids.shape
    flat = ids.reshape(-1)
    order_ids, order = torch.sort(flat, stable=True)
    rows = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    bounds = torch.arange(1, store.num_experts + 1, device=flat.device, dtype=flat.dtype)
    offs = torch.searchsorted(order_ids, bounds, right=False).to(torch.int32)  # pairs with id < e+1
    h = grouped_mm(rows, store.gate_up_all().transpose(1, 2), offs)  # (P, 2I)
    gate, up = h.chunk(2, dim=-1)
    y = grouped_mm((act(gate) * up).contiguous(), store.down_all().transpose(1, 2), offs)  # (P, H)
    unsorted = torch.empty_like(y)
    unsorted[order] = y  # back to (token, slot) order: a permutation, so deterministic
    return (unsorted.view(tokens, k, -1).float() * weights.unsqueeze(-1)).sum(dim=1)


# -- the block -------------------------------------------------------------------------------------------


class FastMoE(Glm4MoeLiteMoE):  # type: ignore[misc]  # transformers is untyped here
    """``Glm4MoeLiteMoE`` computing its experts without host syncs, from :attr:`moe_store`.

    Installed by swapping the class of existing modules (:func:`install_fast_moe`); ``moe_store`` and
    ``moe_path`` are set there.
    """

    moe_store: ExpertWeights
    moe_path: str = "auto"

    def choose_path(self, pairs: int, device: torch.device, dtype: torch.dtype) -> str:
        """``gather`` or ``grouped`` for ``pairs`` (tokens x experts per token), a static shape.

        Plain weights take the grouped GEMM whenever it has a kernel: it reads each used expert once where
        gathering copies every pair's expert and reads the copy again (3x the expert bytes at batch 1, the
        bound on a GPU); on CPU it was faster from 1 token up at the mid size (``benchmarks/bench_moe.py``)
        and only the tiny test model, where per-op overhead dominates, gathers faster. A store that
        materializes (dequantizes) its matrices gathers while that is fewer experts than all of them.
        """
        if self.moe_path != "auto":
            return self.moe_path
        if not grouped_mm_supported(device, dtype):
            return "gather"
        if isinstance(self.moe_store, ParameterExperts):
            return "grouped"
        return "gather" if pairs < self.moe_store.num_experts else "grouped"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        weights, ids = route(self.gate, x)
        path = self.choose_path(ids.numel(), x.device, x.dtype)
        compute = experts_grouped if path == "grouped" else experts_gather
        routed = compute(x, ids, weights, self.moe_store, self.experts.act_fn).to(x.dtype)
        return routed.view(shape) + self.shared_experts(hidden_states)  # type: ignore[no-any-return]


def _replaceable(module: Glm4MoeLiteMoE) -> str | None:
    """Why ``module``'s experts cannot be read as plain parameters (None when they can)."""
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(module.experts, name, None)
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            return f"experts.{name} holds {type(weight).__name__} of dtype {getattr(weight, 'dtype', None)}"
        if weight.is_meta:
            return f"experts.{name} is not materialized (offloaded by a device map?)"
    if "forward" in vars(module) or "forward" in vars(module.experts):
        return "its forward is wrapped per instance (accelerate hooks of a multi-device map); a class swap misses it"
    return None


def install_fast_moe(model: torch.nn.Module, *, path: str = "auto") -> int:
    """Switch every GLM MoE block of ``model`` to :class:`FastMoE`; returns how many. Idempotent.

    A block keeps a store set before (e.g. a quantized one, :func:`set_expert_weights`); others read
    their own parameters (:class:`ParameterExperts`). ``path`` forces ``gather`` or ``grouped``
    (tests, benchmarks); ``auto`` picks per step shape.
    """
    if path not in PATHS:
        raise ValueError(f"MoE path {path!r} is not one of {', '.join(PATHS)}")
    count = 0
    for name, module in model.named_modules():
        if type(module) is FastMoE:
            module.moe_path = path
            count += 1
        elif type(module) is Glm4MoeLiteMoE:
            if not isinstance(getattr(module, "moe_store", None), ExpertWeights):
                reason = _replaceable(module)
                if reason is not None:
                    log.info("%s keeps transformers' MoE: %s", name, reason)
                    continue
                module.moe_store = ParameterExperts(module.experts)
            module.__class__ = FastMoE
            module.moe_path = path
            count += 1
    return count


def set_expert_weights(block: torch.nn.Module, store: ExpertWeights) -> None:
    """Make ``block`` (a GLM MoE block, fast or not yet) compute its routed experts from ``store``."""
    if type(block) not in (FastMoE, Glm4MoeLiteMoE):
        raise TypeError(f"{type(block).__name__} is not a GLM-4.7-Flash MoE block (Glm4MoeLiteMoE)")
    routed = int(block.gate.num_experts)
    if store.num_experts != routed:
        raise ValueError(f"the store holds {store.num_experts} experts, the block routes to {routed}")
    block.moe_store = store


def uninstall_fast_moe(model: torch.nn.Module) -> int:
    """Return every :class:`FastMoE` of ``model`` that reads its own parameters to transformers'
    ``Glm4MoeLiteMoE``; returns how many. Blocks fed by another store stay (transformers' block could
    not compute them)."""
    count = 0
    for name, module in model.named_modules():
        if type(module) is FastMoE:
            if not isinstance(module.moe_store, ParameterExperts):
                log.info("%s keeps the fast MoE: its experts come from %s", name, type(module.moe_store).__name__)
                continue
            module.__class__ = Glm4MoeLiteMoE
            del module.moe_store
            module.__dict__.pop("moe_path", None)
            count += 1
    return count

"""fla's GatedDeltaNet through our gated chunk kernel, as an opt-in kernel swap (the same math, another kernel).

fla 0.6.0 refuses the backward of its gated chunk op on Hopper with 3.4.0 <= triton < 3.7.1 (fla #640, raised in
``chunk_bwd_dqkwg``, ``fla/ops/common/chunk_o.py:727-732``), so its GatedDeltaNet cannot train on such a GPU.
:func:`chunk_gated_delta_rule` here is a drop-in for fla's ``chunk_gated_delta_rule`` (its signature and return
``(o, final_state or None)``, every option the layer passes) that runs
``gated_delta_rule_boundary.chunk_gated_delta_rule_with_boundary_states``, whose backward never calls the refused
function. What fla fuses into its kernel is done here in PyTorch with autograd, as fla's formulas: the q/k L2 norm
(``x / sqrt(sum x^2 + 1e-6)``), the beta sigmoid (times 2 with ``allow_neg_eigval``), the gate
``-exp(A_log) * softplus(g + dt_bias)``; grouped value heads (HV > H) repeat q and k per value head (fla's
``i_h = i_hv // (HV // H)``); varlen ``cu_seqlens`` is batched by right-padding each sequence with tokens that
leave the state as it is (k = v = q = 0, beta = 0, log-decay 0) and gathering the real tokens back.

:func:`use_trl_refine_gated_kernel` makes fla's GatedDeltaNet layers call it while active. Off by default: fla's own
kernel is the faithful default; this is the named departure of docs/faithfulness.md (a kernel swap, not a change of
the math). Cost: the op saves its fp32 chunk-boundary states for the backward (B·HV·ceil(T/64)·K·V·4 bytes a
layer), which fla's op recomputes instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from trl_refine.kernels.gated_delta_rule_boundary import CHUNK, chunk_gated_delta_rule_with_boundary_states

__all__ = [
    "chunk_gated_delta_rule",
    "gated_kernel_inputs",
    "gated_layer_count",
    "gated_layer_kernel_inputs",
    "use_trl_refine_gated_kernel",
]

# fla 0.6.0 names this module relies on (tests/test_fla_gated_patch.py checks them; if an fla upgrade moves them, fix
# this block): the GatedDeltaNet layer class, the module whose global ``chunk_gated_delta_rule`` (imported there from
# fla.ops.gated_delta_rule) the layer's forward calls in chunk mode, and the public package name that
# trl_refine.rollout.fla_readout imports at call time (patched too, so its readout forward takes the same kernel).
FLA_LAYER_MODULE = "fla.layers.gated_deltanet"
FLA_LAYER_CLASS = "GatedDeltaNet"
FLA_OPS_PACKAGE = "fla.ops.gated_delta_rule"
FLA_OP_NAME = "chunk_gated_delta_rule"

_L2NORM_EPS = 1e-6  # fla.modules.norm.l2norm.l2norm_fwd's default, as chunk_gated_delta_rule calls it


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """fla's l2norm: x / sqrt(sum x^2 + eps) in fp32, back in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + _L2NORM_EPS)).to(x.dtype)


def _sequence_bounds(cu_seqlens: torch.Tensor, cu_seqlens_cpu: torch.Tensor | None, T: int) -> list[int]:
    bounds = (cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens).tolist()
    if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {bounds}")
    return bounds


def _padding_index(bounds: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For sequences ``bounds`` of one packed row: token index [N, Tmax] into the row (clamped) and its validity."""
    starts = torch.tensor(bounds[:-1], device=device)
    lengths = torch.tensor(bounds[1:], device=device) - starts
    pos = torch.arange(max(int(lengths.max()), 1), device=device)
    valid = pos[None] < lengths[:, None]
    return (starts[:, None] + pos[None]).clamp(max=max(bounds[-1] - 1, 0)), valid


def _pad(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[1, T, ...] -> [N, Tmax, ...], zero past each sequence's end."""
    x = x[0][index]
    return torch.where(valid.view(*valid.shape, *([1] * (x.dim() - 2))), x, x.new_zeros(()))


def gated_kernel_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What fla's gated chunk op does to its inputs inside its kernel (the flags as fla names them), in PyTorch with
    autograd: ``(q, k, v, g, beta)`` as `chunk_gated_delta_rule_with_boundary_states` takes them, q and k repeated
    per value head (``[B, T, HV, K]``), g the natural-log decay. Shared with the boundary-state provider
    (`trl_refine.rollout.fla_boundary`), which calls our gated kernel directly."""
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    if use_beta_sigmoid_in_kernel:
        beta = (beta.float().sigmoid() * (2.0 if allow_neg_eigval else 1.0)).to(beta.dtype)
    if use_gate_in_kernel:
        gate = g.float() + (dt_bias.float() if dt_bias is not None else 0.0)
        g = -A_log.float().exp() * F.softplus(gate)  # fla's gate; its kernel's softplus is linear past 20, as F's
    group = v.shape[2] // q.shape[2]
    if group > 1:  # grouped value heads: value head i reads q/k head i // group
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    return q, k, v, g, beta


def gated_layer_kernel_inputs(attn, q, k, v, gate_logits, beta_logits):
    """`gated_kernel_inputs` with the flags and gate parameters fla's GatedDeltaNet layer passes to its chunk op
    (fla/layers/gated_deltanet.py, 0.6.0)."""
    return gated_kernel_inputs(
        q, k, v, gate_logits, beta_logits, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=attn.allow_neg_eigval, use_gate_in_kernel=True, A_log=attn.A_log, dt_bias=attn.dt_bias,
    )  # fmt: skip


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    cp_context: object | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla 0.6.0's ``chunk_gated_delta_rule`` (same arguments, shapes and ``(o [B, T, HV, V], final_state [N, HV, K,
    V] fp32 or None)``; ``[N, HV, V, K]`` with ``state_v_first``) by our gated chunk kernel. ``use_gate_in_kernel``,
    ``A_log``, ``dt_bias`` and ``chunk_size`` (64 only) come as keywords, as fla takes them; ``chunk_indices`` is
    derived from ``cu_seqlens`` and not needed. Refused: context parallelism (``cp_context``) and other chunk sizes."""
    if "transpose_state_layout" in kwargs:  # fla's deprecated name for state_v_first
        if state_v_first:
            raise ValueError("Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`.")
        state_v_first = bool(kwargs.pop("transpose_state_layout"))
    use_gate_in_kernel = bool(kwargs.pop("use_gate_in_kernel", False))
    A_log, dt_bias = kwargs.pop("A_log", None), kwargs.pop("dt_bias", None)
    chunk_size = kwargs.pop("chunk_size", CHUNK)
    if kwargs:
        raise TypeError(
            f"trl_refine's chunk_gated_delta_rule does not know the arguments {sorted(kwargs)} (fla 0.6.0's set): "
            "drop them, or run fla's own kernel (leave use_trl_refine_gated_kernel off)"
        )
    if cp_context is not None:
        raise NotImplementedError(
            "context parallelism (cp_context) is not supported by trl_refine's gated kernel: run fla's own kernel"
        )
    if chunk_size != CHUNK:
        raise ValueError(f"trl_refine's gated kernel uses chunks of {CHUNK} tokens, got chunk_size={chunk_size}")
    if q.shape[2] != k.shape[2] or v.shape[2] % q.shape[2] != 0:
        raise ValueError(
            f"q and k need the same heads H and v a multiple HV of them, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if use_gate_in_kernel and A_log is None:
        raise ValueError("A_log must be provided when use_gate_in_kernel=True.")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")

    q, k, v, g, beta = gated_kernel_inputs(
        q, k, v, g, beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
        use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
    )  # fmt: skip
    scale = k.shape[-1] ** -0.5 if scale is None else scale

    if cu_seqlens is None:
        o, _, final = chunk_gated_delta_rule_with_boundary_states(
            q, k, v, g, beta, scale, initial_state=initial_state, state_v_first=state_v_first
        )
    else:
        if q.shape[0] != 1:
            raise ValueError(
                f"The batch size is expected to be 1 rather than {q.shape[0]} when using `cu_seqlens`: flatten "
                "variable-length inputs first"
            )
        bounds = _sequence_bounds(cu_seqlens, cu_seqlens_cpu, q.shape[1])
        if initial_state is not None and initial_state.shape[0] != len(bounds) - 1:
            raise ValueError(
                f"one initial state per sequence: expected {len(bounds) - 1}, got {initial_state.shape[0]}"
            )
        index, valid = _padding_index(bounds, q.device)
        padded = (_pad(x, index, valid) for x in (q, k, v, g, beta))
        o, _, final = chunk_gated_delta_rule_with_boundary_states(
            *padded, scale, initial_state=initial_state, state_v_first=state_v_first
        )
        o = o[valid][None]  # the real tokens, in the packed order
    return o.to(q.dtype), final.contiguous() if output_final_state else None


def _layer_class() -> type:
    return getattr(importlib.import_module(FLA_LAYER_MODULE), FLA_LAYER_CLASS)


def gated_layer_count(model: torch.nn.Module) -> int:
    """How many fla GatedDeltaNet layers ``model`` has (the layers the swap reaches)."""
    layer_class = _layer_class()
    return sum(isinstance(m, layer_class) for m in model.modules())


@contextmanager
def use_trl_refine_gated_kernel(model: torch.nn.Module) -> Iterator[int]:
    """While active, fla's GatedDeltaNet layers run their chunk mode (every forward with grad, and long no-grad
    ones) through trl_refine's gated kernel instead of fla's; yields how many such layers ``model`` has.

    The swap is of the module-level name the layer calls (and of fla's public ``fla.ops.gated_delta_rule`` name, which
    trl_refine's readout forward imports at call time), so it holds for every GatedDeltaNet in the process while
    active, and autograd keeps the kernel of each forward for its backward (also after the block). Anything that
    reruns a forward during the backward (gradient checkpointing, ``nsp_segment_checkpointing``) looks the op up
    again then: keep the whole step, backward included, inside the block. Short no-grad
    calls (fla's fused_recurrent mode, up to 64 tokens in eval) keep fla's kernel, which has no backward to refuse.
    Other fla layers calling fla's gated op (``mom``) are not swapped. Nested use is fine. The trainer and test-time
    ReFINE hold this block for you with ``fla_gated_kernel="trl_refine"`` (`trl_refine.kernels.fla_gated_choice`)."""
    layers = gated_layer_count(model)
    if layers == 0:
        raise ValueError(
            f"{type(model).__name__} has no fla GatedDeltaNet layer ({FLA_LAYER_MODULE}.{FLA_LAYER_CLASS}): the "
            "gated kernel swap applies to fla GatedDeltaNet models only; drop use_trl_refine_gated_kernel here"
        )
    modules = [importlib.import_module(name) for name in (FLA_LAYER_MODULE, FLA_OPS_PACKAGE)]
    previous = [getattr(module, FLA_OP_NAME) for module in modules]
    try:
        for module in modules:
            setattr(module, FLA_OP_NAME, chunk_gated_delta_rule)
        yield layers
    finally:
        for module, fn in zip(modules, previous):
            setattr(module, FLA_OP_NAME, fn)

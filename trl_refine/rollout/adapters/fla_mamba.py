"""State adapter for fla's ``mamba2`` and ``mamba`` (`fla.models.Mamba2ForCausalLM`, `fla.models.MambaForCausalLM`).

fla's cache is its per-layer dict (``conv_state`` [N, D, W], ``recurrent_state``), so rows are selected, stacked and
rebuilt as for the other fla families (`FlaStateAdapter`). What fla's `fla.layers.Mamba2` / `fla.layers.Mamba`
layers lack is a multi-token call continuing a cache ("... cached decoding only supports a single new token per
step"). `prepare` swaps each such layer's class for a subclass whose forward, for a call of more than one token on a
filled cache, runs the layer's own projections, the causal conv over the cached window and the scan from the cached
state, then the layer's gate / norm and output projection: for Mamba-2 the chunked SSD scan of transformers
(its PyTorch `mamba2_chunk_scan`, which takes ``initial_states``; the arithmetic of fla's own PyTorch prefill), for
Mamba the selective recurrence shared with transformers' Mamba (`mamba_scan_from_state`; fla's layer has the same
parameters). Every other call (no cache, one token) is fla's own forward. Checked against the generic engine under
the Triton interpreter (tests/test_fla_families_interpret.py).

Documents run one per call (``packing = "serial"``): fla's layer takes no ``cu_seqlens``, and a padded token still
decays the SSM state, so neither packing nor left padding continues a state exactly.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from trl_refine import _compat
from trl_refine.rollout.adapters.transformers_mamba import mamba_scan_from_state
from trl_refine.rollout.state import FlaStateAdapter, State


def unsupported_fla_mamba2(config) -> str:
    """Why fla's Mamba-2 ``config`` cannot run on this adapter ('' when it can)."""
    if getattr(config, "n_groups", 1) != 1:
        # fla's prefill repeats the B / C groups over heads (g0 g1 g0 g1), its decode step interleaves them (g0 g0 g1
        # g1): the two disagree, so no continuation reproduces both
        return "fla mamba2 with n_groups > 1 (fla's prefill and decode order the B / C groups differently)"
    if getattr(config, "D_has_hdim", False):
        return "fla mamba2 with D_has_hdim (a per-channel skip the continuing scan does not take)"
    return ""


class FlaMambaStateAdapter(FlaStateAdapter):
    """fla's per-layer dict cache, one document per call; the layers continue a cache over many tokens after
    `prepare` (module doc)."""

    packing = "serial"

    def prepare(self, model: torch.nn.Module) -> None:
        from fla.layers import Mamba, Mamba2

        for module in model.modules():
            if type(module) in (Mamba, Mamba2):
                module.__class__ = continuing_layer_class(type(module))

    def continuation_kwargs(self, state: State | None, offset: int, width: int, device) -> dict:
        return {}

    @staticmethod
    def scatter_rows(state: State, index: torch.Tensor, rows: State) -> State:
        raise NotImplementedError("serial packing never scatters rows")


@functools.cache
def continuing_layer_class(base: type) -> type:
    """``base`` (fla's ``Mamba2`` or ``Mamba`` layer) with a forward that also continues a filled cache over many
    tokens."""
    step = mamba2_from_state if base.__name__ == "Mamba2" else mamba_from_state

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        seq_len = hidden_states.shape[1]
        layer = self.layer_idx
        last = past_key_values[layer] if past_key_values is not None and len(past_key_values) > layer else None
        if last is None or last.get("recurrent_state") is None or seq_len <= 1:
            return base.forward(
                self, hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                use_cache=use_cache, **kwargs,
            )  # fmt: skip
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                f"fla {base.__name__}: a padded call cannot continue a cached state (one document per call)"
            )
        output, conv_state, ssm_state = step(self, hidden_states, last)
        past_key_values.update(recurrent_state=ssm_state, conv_state=conv_state, layer_idx=layer, offset=seq_len)
        return output, None, past_key_values

    return type(f"Continuing{base.__name__}", (base,), {"forward": forward, "__module__": __name__})


def mamba_from_state(layer, hidden_states: torch.Tensor, last: dict):
    """fla's Mamba PyTorch path, continuing ``last``: output, new conv window, new SSM state."""
    window = last["conv_state"]
    output, full, state = mamba_scan_from_state(
        layer,
        hidden_states,
        lambda x: torch.cat([window.to(x.dtype), x], dim=-1),
        last["recurrent_state"],
        time_step_rank=layer.dt_rank,
        gate_act=layer.act,
    )
    return output, full[..., -window.shape[-1] :], state


def mamba2_from_state(layer, hidden_states: torch.Tensor, last: dict):
    """fla's Mamba-2 PyTorch prefill, continuing ``last`` (its cache dict): output, new conv window, new SSM state."""
    batch, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    projected = layer.in_proj(hidden_states)
    inner, groups_states = layer.intermediate_size, layer.n_groups * layer.ssm_state_size
    d_mlp = (projected.shape[-1] - 2 * inner - 2 * groups_states - layer.num_heads) // 2
    _, _, gate, xbc, dt = projected.split([d_mlp, d_mlp, inner, layer.conv_dim, layer.num_heads], dim=-1)
    window = last["conv_state"]
    full = torch.cat([window.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)
    conv_state = full[..., -window.shape[-1] :]
    weight = layer.conv1d.weight
    conv = F.conv1d(full.to(weight.dtype), weight, layer.conv1d.bias, groups=layer.conv_dim)[..., -seq_len:]
    xbc = layer.act(conv.transpose(1, 2))
    x, B, C = torch.split(xbc, [inner, groups_states, groups_states], dim=-1)
    y, ssm_state = _compat.mamba2_chunk_scan(
        x.reshape(batch, seq_len, layer.num_heads, layer.head_dim),
        dt,
        -torch.exp(layer.A_log.float()),
        B.reshape(batch, seq_len, layer.n_groups, layer.ssm_state_size),
        C.reshape(batch, seq_len, layer.n_groups, layer.ssm_state_size),
        chunk_size=layer.chunk_size,
        D=layer.D,
        dt_bias=layer.dt_bias,
        initial_states=last["recurrent_state"],
        dt_softplus=True,
        dt_limit=tuple(layer.dt_limit),
        return_final_states=True,
    )
    y = y.reshape(batch, seq_len, -1)
    scan_output = layer.norm(y, gate) if layer.rmsnorm else y * layer.act(gate)
    return layer.out_proj(scan_output.to(dtype)), conv_state, ssm_state

"""State adapter for transformers' pure state-space models: ``mamba2`` (`Mamba2ForCausalLM`) and ``mamba``
(`MambaForCausalLM`).

Both keep their state in transformers' layered `DynamicCache` (one `LinearAttentionLayer` per block: the conv window
and the SSM state), the layout of the hybrids' recurrent layers, so snapshots, row selection, stacking, expansion for
the G branches and cache rebuilding are `TransformersHybridStateAdapter`'s (without attention K/V). What differs:

* the cache argument and output are ``cache_params``, not ``past_key_values`` (a ``past_key_values`` argument is
  silently ignored): the engines pass it through `trl_refine.modeling_utils.cache_kwargs` / `output_cache`;
* **Mamba-2** continues a cache over many tokens itself (its chunked scan takes the cached state as
  ``initial_states``); its single-token step writes the state in place, so a one-token call with gradients is
  refused with the fix, as for the Mamba-2 hybrids;
* **Mamba** (v1) does not: its selective scan always starts from a zero state (the cached state is only read by the
  single-token step). `prepare` swaps each ``MambaMixer``'s class for `continuing_mixer_class`, whose forward, on
  the engine's caches only (their rebinding layers), runs the same projections, convolution and recurrence starting
  from the cached state, out of place (so one-token calls are differentiable too). On any other cache, or none, it
  is transformers' own forward.

Documents run one per call (``packing = "serial"``): a padded token still decays the SSM state (``dt`` is not
masked), so a left-padded row continuing from a non-empty state would not be exact.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from trl_refine import _compat
from trl_refine.rollout.adapters.transformers_hybrid import TransformersHybridStateAdapter, _RebindingStates
from trl_refine.rollout.state import State

#: model types served here when the config is transformers' own (fla registers configs of the same names)
MAMBA_MODEL_TYPES = ("mamba2", "mamba")


def is_transformers_mamba(config) -> bool:
    """``config`` is transformers' `Mamba2Config` / `MambaConfig` (fla's classes share the model types)."""
    return getattr(config, "model_type", None) in MAMBA_MODEL_TYPES and type(config).__module__.startswith(
        "transformers."
    )


class TransformersMambaStateAdapter(TransformersHybridStateAdapter):
    """Snapshots of transformers' Mamba / Mamba-2 caches (conv + SSM state per layer), see module doc."""

    def __init__(self, config):
        super().__init__(config, share_prefix_kv=False)

    def prepare(self, model: torch.nn.Module) -> None:
        if self.model_type != "mamba":
            return
        base = _compat.mamba_mixer_class()
        for module in model.modules():
            if type(module) is base:
                module.__class__ = continuing_mixer_class(base)

    def continuation_kwargs(self, state: State | None, offset: int, width: int, device) -> dict:
        if width == 1 and torch.is_grad_enabled() and self.model_type == "mamba2":
            raise ValueError(
                "mamba2: transformers' Mamba-2 single-token step updates its state in place, so a one-token call "
                "cannot be differentiated (rollout_length 2, or two chosen positions next to each other). Use a "
                "rollout length of at least 3, or nsp_engine='generic'."
            )
        return {}


@functools.cache
def continuing_mixer_class(base: type) -> type:
    """``base`` (transformers' ``MambaMixer``) with a forward that continues the engine's cached states."""

    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        layers = getattr(cache_params, "layers", None)
        if layers is None or not isinstance(layers[self.layer_idx], _RebindingStates):
            return base.forward(
                self, hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs
            )
        return mamba_mixer_from_state(self, hidden_states, cache_params, attention_mask)

    return type(f"Continuing{base.__name__}", (base,), {"forward": forward, "__module__": __name__})


def mamba_mixer_from_state(mixer, hidden_states: torch.Tensor, cache, attention_mask=None) -> torch.Tensor:
    """transformers' ``MambaMixer`` PyTorch path, starting from the SSM state in ``cache`` (`mamba_scan_from_state`);
    updates ``cache``."""
    output, _, state = mamba_scan_from_state(
        mixer,
        hidden_states,
        lambda x: cache.update_conv_state(x, mixer.layer_idx, conv_kernel_size=mixer.conv_kernel_size),
        cache.get_recurrent_state(mixer.layer_idx, state_idx=0),
        time_step_rank=mixer.time_step_rank,
        gate_act=F.silu,
        attention_mask=attention_mask,
    )
    cache.update_recurrent_state(state, mixer.layer_idx)
    return output


def mamba_scan_from_state(
    mixer, hidden_states: torch.Tensor, extend_window, initial, *, time_step_rank: int, gate_act, attention_mask=None
):
    """A Mamba (v1) mixer's PyTorch path (transformers' ``MambaMixer``, fla's ``Mamba``: the same parameters) starting
    from the SSM state ``initial`` ([B, D, N], None: zeros): projections, the causal conv over
    ``extend_window(x)`` (the cached pre-conv window followed by the new inputs ``x`` [B, D, T]), the selective
    recurrence in fp32, D skip and gate. Returns the output, the extended window and the final SSM state."""
    seq_len, dtype = hidden_states.shape[1], hidden_states.dtype
    if attention_mask is not None:
        hidden_states = (hidden_states * attention_mask[:, -seq_len:, None]).to(dtype)
    x, gate = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
    full = extend_window(x)
    weight = mixer.conv1d.weight
    x = F.conv1d(
        full.to(weight.dtype), weight, mixer.conv1d.bias, padding=weight.shape[-1] - 1, groups=weight.shape[0]
    )[..., : full.shape[-1]][..., -seq_len:]
    x = mixer.act(x).to(dtype)  # [B, D, T]
    if attention_mask is not None:
        x = x * attention_mask[:, None, -seq_len:].to(dtype)
    time_step, B, C = torch.split(
        mixer.x_proj(x.transpose(1, 2)), [time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1
    )
    dt = mixer.dt_proj.weight @ time_step.transpose(1, 2)
    if mixer.dt_proj.bias is not None:
        dt = dt + mixer.dt_proj.bias.float().to(dt.dtype)[..., None]
    dt = F.softplus(dt)
    A = -torch.exp(mixer.A_log.float())
    decay = torch.exp(A[None, :, None, :] * dt[..., None])  # [B, D, T, N]
    drive = dt[..., None] * B[:, None, :, :].float() * x[..., None].float()
    state = x.new_zeros(*x.shape[:2], A.shape[-1], dtype=torch.float32) if initial is None else initial.float()
    outputs = []
    # unbind, not an index per step: the backward of a per-step slice writes a full-size gradient each step
    for decay_t, drive_t, c_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(1)):
        state = decay_t * state + drive_t
        outputs.append(torch.matmul(state.to(x.dtype), c_t[:, :, None].to(x.dtype))[..., 0])
    y = torch.stack(outputs, dim=-1) + x * mixer.D.float()[None, :, None]
    y = y * gate_act(gate)
    return mixer.out_proj(y.transpose(1, 2).to(dtype)), full, state

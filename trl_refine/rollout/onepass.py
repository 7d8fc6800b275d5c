"""The one-pass engine: the snapshot engine with the n+1 segment calls replaced by one forward per pass.

Models that declare ``supports_state_positions`` compute, in one forward over the whole documents, every layer's
cache state after each chosen position (``forward(state_positions=[B, n])`` → ``position_states``): the recurrent
state at the position's chunk boundary plus the delta rule over the ≤ 63 tokens of its chunk, and the conv states
as the last few projected inputs. Those states are autograd outputs of the same pass, so the policy gradient
reaches the prefix through them as in the segmented pass. Everything after the document pass (branching the G
rollouts, decoding, the branch call of the loss, reusing the sampling pass) is the snapshot engine's.

A step makes 1 document-pass call where the snapshot engine makes n+1 (per pass), and every shape of the pass is
fixed by (B, L, n): nothing depends on where the positions fall. Two providers of the states:

* models that declare ``supports_state_positions``: the reference DeltaNet (`trl_refine.models.delta_net`, pure
  PyTorch: chunk-boundary state + masked WY step) and LaCT (`trl_refine.models.lact`, pure PyTorch: the fast weights
  of the position's large chunk + its masked update sums, and the attention window gathered per position);
* fla's ``DeltaNetForCausalLM`` and ``GatedDeltaNetForCausalLM``, with fla's own kernels: readout tokens spliced in
  after each position (`trl_refine.rollout.fla_readout`, ``states="readout"``, the default); or
  ``states="boundary"``: our (gated) delta-rule kernel that returns the states at the positions from the chunk
  boundary states (and takes their gradients; `trl_refine.rollout.fla_boundary`; no readout tokens).

The *fused scan* (``nsp_fuse_scan``, with the sampling pass reused for the loss) also folds the step's scan into that
forward: `OnePassEngine.fused_scan` runs the one forward with gradients over the documents before the positions
exist, keeping what gives the states at any positions afterwards (models that declare ``supports_deferred_states``,
``forward(deferred_states=True)``: the reference DeltaNet keeps per layer the chunk-boundary states, the chunks' WY
factors and the conv inputs; LaCT the post-RoPE attention keys/values, the fast-weight inputs and each large chunk's
weights; fla DeltaNet / GatedDeltaNet with ``states="boundary"``: `record_boundary_deferred_states`, every
chunk-boundary state from our kernel), and the scan's entropies, log-probs and hidden states come from its last hidden states (detached, the LM
head in chunks). The positions are selected from those entropies, and `OnePassEngine.generate_fused` reads the
states at them from the kept tensors, differentiably, as the sampling pass of the loss. So a step makes one document
forward instead of two (the no-grad scan and the document pass), with the same math.

Exactness against the snapshot and generic engines is tested on CPU in fp32 (`tests/test_onepass_engine.py`, the
reference DeltaNet and LaCT; fla's kernels under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trl_refine.modeling_utils import capture_last_hidden_state, unwrap
from trl_refine.rollout.base import DocumentBatch, RolloutOutput, RolloutPlan, ScanOutput
from trl_refine.rollout.fla_boundary import (
    fla_boundary_support,
    record_boundary_deferred_states,
    record_boundary_position_states,
)
from trl_refine.rollout.fla_readout import fla_readout_support, record_position_states
from trl_refine.rollout.fsdp_head import hold_lm_head
from trl_refine.rollout.generic import scan_from_hidden
from trl_refine.rollout.snapshot import SnapshotEngine, _param_versions, check_reuse_allowed
from trl_refine.rollout.state import State, map_tensors

#: how the states at the positions come out of fla's DeltaNet / GatedDeltaNet (``OnePassEngine(states=...)``)
FLA_STATE_PROVIDERS = {"readout": record_position_states, "boundary": record_boundary_position_states}


def per_chunk(states: list[dict], num_chunks: int) -> list[State]:
    """Per layer, tensors [B, n, ...] → one state of B rows per chunk."""
    return [map_tensors(states, lambda t, j=j: t[:, j]) for j in range(num_chunks)]


@dataclass
class PendingPass:
    """The fused scan's forward (with gradients), waiting for its positions: ``states.at(positions)`` gives every
    layer's states after them from the kept tensors, ``doc_hidden`` [B, L, H] is in the graph. It serves one
    `OnePassEngine.generate_fused`, for the model that ran it, with its parameters unchanged."""

    states: Any  # an object with ``at(positions [B, n]) -> per layer, fla's cache dict of [B, n, ...] tensors``
    doc_hidden: torch.Tensor
    model: torch.nn.Module
    param_versions: int
    used: bool = False

    def document_pass(self, model, docs: DocumentBatch, plan: RolloutPlan) -> tuple[list[State], torch.Tensor]:
        if self.used or model is not self.model or _param_versions(model) != self.param_versions:
            raise ValueError(
                "this fused scan cannot serve the sampling pass: it was already used, or ran on another model or "
                "before the weights changed (run a new fused_scan)"
            )
        self.used = True
        return per_chunk(self.states.at(plan.positions), plan.num_chunks), self.doc_hidden


class OnePassEngine(SnapshotEngine):
    """Snapshot engine whose document pass is a single forward returning the states at the positions.

    ``states``: the provider for fla models, ``"readout"`` (readout tokens in fla's kernels, DeltaNet and
    GatedDeltaNet) or ``"boundary"`` (the boundary-state kernels, DeltaNet and GatedDeltaNet); models that declare
    ``supports_state_positions`` compute their own."""

    name = "onepass"
    # declared, not inherited: what the trainer checks (ZeRO-3, activation checkpointing) is this engine's own claim
    reuses_sampling_pass = True
    applies_lm_head_outside_forward = True  # the snapshot engine's branch decoding applies the head to hidden states
    needs_recurrent_cache_in_training = True  # the branch calls of the loss continue from the states as a cache

    def __init__(
        self, pad_token_id: int = 0, adapter=None, checkpoint_segments: bool = False, states: str = "readout"
    ):
        problem = self.options_problem(checkpoint_segments=checkpoint_segments)
        if problem:
            raise ValueError(f"{problem}: set nsp_segment_checkpointing=False, or use nsp_engine='snapshot'")
        if states not in FLA_STATE_PROVIDERS:
            raise ValueError(f"OnePassEngine(states={states!r}): use one of {', '.join(FLA_STATE_PROVIDERS)}")
        super().__init__(pad_token_id=pad_token_id, adapter=adapter)
        self.states = states

    @classmethod
    def options_problem(cls, *, checkpoint_segments: bool = False) -> str:
        if checkpoint_segments:
            return (
                "the one-pass engine has no segments to checkpoint (nsp_segment_checkpointing=True asks the snapshot "
                "engine to trade time for activation memory)"
            )
        return ""

    @classmethod
    def auto_reason(cls, model) -> str:
        name = type(unwrap(model)).__name__
        if getattr(unwrap(model), "supports_state_positions", False):
            how = f"{name} returns its states at the positions from one forward (supports_state_positions)"
        else:
            how = f"{name}'s states at the positions come from one forward of fla's kernels (readout tokens)"
        return (
            f"{how}: 1 document pass per step instead of n+1 segment calls (steps 1.9-3.0x faster than the snapshot "
            "engine's, fla DeltaNet 1.3B at 8K on an H200, docs/benchmarks.md)"
        )

    @classmethod
    def supports(cls, model) -> tuple[bool, str]:
        base = unwrap(model)
        if not getattr(base, "supports_state_positions", False):
            ok, why = fla_readout_support(model)
            if not ok:
                return False, (
                    f"{type(base).__name__} does not return its states at given positions from one forward "
                    f"(supports_state_positions), and the fla readout path does not apply: {why}"
                )
        return super().supports(model)

    def document_pass(self, model, docs: DocumentBatch, plan: RolloutPlan) -> tuple[list[State], torch.Tensor]:
        self._adapter(model)
        kwargs = dict(input_ids=docs.input_ids, attention_mask=docs.attention_mask, use_cache=False, logits_to_keep=1)
        if getattr(unwrap(model), "supports_state_positions", False):
            with capture_last_hidden_state(model) as hidden:
                states = model(**kwargs, state_positions=plan.positions).position_states
        else:
            with (
                FLA_STATE_PROVIDERS[self.states](model, docs.attention_mask, plan.positions) as layers,
                capture_last_hidden_state(model) as hidden,
            ):
                model(**kwargs)
            states = [layers[i] for i in sorted(layers)]
        return per_chunk(states, plan.num_chunks), hidden["hidden"]

    # ------------------------------------------------------------------------------------------------------------------
    def fused_scan_problem(self, model) -> str:
        base = unwrap(model)
        if getattr(base, "supports_deferred_states", False):
            return ""
        if getattr(base, "supports_state_positions", False):
            return (
                f"{type(base).__name__} gives its states only at positions known before its forward "
                "(it does not declare supports_deferred_states)"
            )
        if self.states != "boundary":
            return (
                "for fla models only the boundary-state provider (OnePassEngine(states='boundary')) keeps the "
                "chunk-boundary states that the states at positions chosen later are read from"
            )
        ok, why = fla_boundary_support(model)
        return "" if ok else why

    def fused_scan(self, model, docs: DocumentBatch, train_model) -> tuple[ScanOutput, PendingPass]:
        problem = self.fused_scan_problem(train_model)
        if problem:
            raise ValueError(
                f"the one-pass engine has no fused scan for this model: {problem}. Set nsp_fuse_scan=False"
            )
        check_reuse_allowed(train_model)
        self._adapter(train_model)
        kwargs = dict(input_ids=docs.input_ids, attention_mask=docs.attention_mask, use_cache=False, logits_to_keep=1)
        with torch.enable_grad():
            if getattr(unwrap(train_model), "supports_deferred_states", False):
                with capture_last_hidden_state(train_model) as hidden:
                    states = train_model(**kwargs, deferred_states=True).deferred_states
            else:
                with (
                    record_boundary_deferred_states(train_model, docs.attention_mask) as states,
                    capture_last_hidden_state(train_model) as hidden,
                ):
                    train_model(**kwargs)
        doc_hidden = hidden["hidden"]
        pending = PendingPass(states, doc_hidden, train_model, _param_versions(train_model))
        return scan_from_hidden(model, docs, doc_hidden), pending

    def generate_fused(
        self, model, docs: DocumentBatch, plan: RolloutPlan, pending: PendingPass, generator=None, need_hidden=True
    ) -> RolloutOutput:
        with hold_lm_head(model):
            return self._generate(
                model, docs, plan, generator, pending.model, need_hidden, document_pass=pending.document_pass
            )

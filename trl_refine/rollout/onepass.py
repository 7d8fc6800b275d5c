"""The one-pass engine: the snapshot engine with the n+1 segment calls replaced by one forward per pass.

Models that declare ``supports_state_positions`` compute, in one forward over the whole documents, every layer's
cache state after each chosen position (``forward(state_positions=[B, n])`` → ``position_states``): the recurrent
state at the position's chunk boundary plus the delta rule over the ≤ 63 tokens of its chunk, and the conv states
as the last few projected inputs. Those states are autograd outputs of the same pass, so the policy gradient
reaches the prefix through them as in the segmented pass. Everything after the document pass (branching the G
rollouts, decoding, the branch call of the loss, reusing the sampling pass) is the snapshot engine's.

A step makes 1 document-pass call where the snapshot engine makes n+1 (per pass), and every shape of the pass is
fixed by (B, L, n): nothing depends on where the positions fall. Exactness against the snapshot and generic engines
is tested on CPU in fp32 (`tests/test_onepass_engine.py`). Today the reference DeltaNet
(`trl_refine.models.delta_net`, pure PyTorch) declares the ability; fla's Triton kernels return only the final state.
"""

from __future__ import annotations

import torch

from trl_refine.modeling_utils import capture_last_hidden_state, unwrap
from trl_refine.rollout.base import DocumentBatch, RolloutPlan
from trl_refine.rollout.snapshot import SnapshotEngine
from trl_refine.rollout.state import State, map_tensors


class OnePassEngine(SnapshotEngine):
    """Snapshot engine whose document pass is a single forward returning the states at the positions."""

    name = "onepass"

    def __init__(self, pad_token_id: int = 0, adapter=None, checkpoint_segments: bool = False):
        if checkpoint_segments:
            raise ValueError(
                "the one-pass engine has no segments to checkpoint: set nsp_segment_checkpointing=False, or use "
                "nsp_engine='snapshot' to trade time for activation memory"
            )
        super().__init__(pad_token_id=pad_token_id, adapter=adapter)

    @classmethod
    def supports(cls, model) -> tuple[bool, str]:
        base = unwrap(model)
        if not getattr(base, "supports_state_positions", False):
            return False, (
                f"{type(base).__name__} does not return its states at given positions from one forward "
                "(supports_state_positions)"
            )
        return super().supports(model)

    def document_pass(self, model, docs: DocumentBatch, plan: RolloutPlan) -> tuple[list[State], torch.Tensor]:
        self._adapter(model)
        with capture_last_hidden_state(model) as store:
            out = model(
                input_ids=docs.input_ids,
                attention_mask=docs.attention_mask,
                state_positions=plan.positions,
                logits_to_keep=1,
            )
        states = out.position_states  # per layer, tensors [B, n, ...]
        snapshots = [map_tensors(states, lambda t, j=j: t[:, j]) for j in range(plan.num_chunks)]
        return snapshots, store["hidden"]

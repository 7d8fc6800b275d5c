"""The rollout-engine interface.

An engine turns a batch of documents and the chosen prefix positions into rollouts (sampling, no gradients) and,
for the loss, into differentiable log-probabilities of the document tokens (NTP term) and of the rollout tokens
(NSP term). Everything else in ReFINE (selection, rewards, advantages, loss assembly) is engine-agnostic.

Conventions shared by every engine:

* Documents are left-padded: ``input_ids[b, first[b]:]`` are the valid tokens, ``attention_mask`` marks them.
* ``positions[b, j]`` is the index (in padded coordinates) of the **last prefix token** of chunk ``j``; the
  ground-truth continuation is ``input_ids[b, t + 1 : t + 1 + k]``.
* Rollout rows are ordered document → chunk → rollout: row ``(b * n + j) * G + g``.
* ``logps[b, t]`` is ``log p(x[t + 1] | x[: t + 1])`` (0 where ``t + 1`` is padding or past the end).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DocumentBatch:
    """Left-padded token ids of B documents."""

    input_ids: torch.LongTensor  # [B, L]
    attention_mask: torch.LongTensor  # [B, L]

    @property
    def batch_size(self) -> int:
        return self.input_ids.size(0)

    @property
    def lengths(self) -> torch.LongTensor:
        return self.attention_mask.sum(-1)

    @property
    def first_valid(self) -> torch.LongTensor:
        """Index of the first valid (non-pad) token of each row."""
        return self.input_ids.size(1) - self.lengths

    def label_mask(self) -> torch.BoolTensor:
        """[B, L]: position t has a next-token label (t and t+1 both valid)."""
        m = self.attention_mask.bool()
        out = torch.zeros_like(m)
        out[:, :-1] = m[:, :-1] & m[:, 1:]
        return out

    def to(self, device: torch.device | str) -> DocumentBatch:
        return DocumentBatch(self.input_ids.to(device), self.attention_mask.to(device))


@dataclass
class ScanOutput:
    """Teacher-forced pass over the documents (no gradients)."""

    entropy: torch.Tensor  # [B, L] entropy of the next-token distribution at t (0 where there is no label)
    hidden_states: torch.Tensor  # [B, L, H] last-layer hidden states (after the final norm)
    logps: torch.Tensor  # [B, L] log-prob of the next document token


@dataclass
class RolloutPlan:
    """Where to branch and how much to sample."""

    positions: torch.LongTensor  # [B, n] last prefix token per chunk
    num_rollouts: int  # G
    rollout_length: int  # k
    #: tokens never sampled (EOS unless ``nsp_sample_eos``: the release masks it with min_new_tokens = k); their
    #: probability still counts in the old log-probs, which come from the unmasked distribution
    masked_token_ids: tuple[int, ...] = ()

    @property
    def num_chunks(self) -> int:
        return self.positions.size(1)

    @property
    def num_rows(self) -> int:
        return self.positions.numel() * self.num_rollouts

    def row_positions(self) -> torch.LongTensor:
        """[B*n*G] prefix end of every rollout row."""
        return self.positions.reshape(-1).repeat_interleave(self.num_rollouts)

    def row_documents(self) -> torch.LongTensor:
        """[B*n*G] document index of every rollout row."""
        b, n = self.positions.shape
        return torch.arange(b, device=self.positions.device).repeat_interleave(n * self.num_rollouts)

    def ground_truth(self, docs: DocumentBatch) -> torch.LongTensor:
        """[B*n*G, k] ground-truth continuation of every rollout row."""
        offsets = torch.arange(1, self.rollout_length + 1, device=self.positions.device)
        idx = self.row_positions()[:, None] + offsets
        return docs.input_ids[self.row_documents()[:, None], idx]

    def ground_truth_hidden(self, scan: ScanOutput) -> torch.Tensor:
        """[B*n*G, k, H] scan hidden states where the ground-truth tokens are the input."""
        offsets = torch.arange(1, self.rollout_length + 1, device=self.positions.device)
        idx = self.row_positions()[:, None] + offsets
        return scan.hidden_states[self.row_documents()[:, None], idx]


@dataclass
class RolloutOutput:
    """Sampled continuations with what the reward and the importance ratio need (no gradients)."""

    completion_ids: torch.LongTensor  # [R, k]
    old_logps: torch.Tensor  # [R, k] log-prob of each sampled token under the sampling policy
    hidden_states: torch.Tensor | None  # [R, k, H] last-layer hidden state where rollout token i is the input
    #: engine-specific part of the loss forward computed while sampling (with gradients), handed back to
    #: `RolloutEngine.forward_train` as ``sampling_pass``; None unless ``generate`` was given a ``train_model``
    sampling_pass: Any = None


@dataclass
class TrainForward:
    """Differentiable outputs for the combined loss."""

    doc_logps: torch.Tensor  # [B, L] log-prob of the next document token (grad), 0 where masked
    rollout_logps: torch.Tensor  # [R, k] log-prob of the rollout tokens (grad)
    rollout_entropy: torch.Tensor | None = None  # [R, k] entropy at the rollout tokens (for metrics)


class RolloutEngine(ABC):
    """Computes rollouts and the loss forward for a causal LM.

    Engines must make the same number of model calls on every process for the same batch geometry (documents,
    n, G, k), whatever the document lengths, so that FSDP / ZeRO-3 collectives stay in step.
    """

    #: short name used in configs and logs
    name: str = "base"
    #: whether ``generate(..., train_model=...)`` can compute the loss forward's document pass while sampling, so
    #: that ``forward_train(..., sampling_pass=...)`` does not run it again
    reuses_sampling_pass: bool = False
    #: whether the engine applies the LM head weight to hidden states outside a model call (DeepSpeed ZeRO-3
    #: has released the partitioned weight there, so such engines cannot run under ZeRO-3)
    applies_lm_head_outside_forward: bool = False
    #: whether the engine needs the model's recurrent cache in training mode (HF activation checkpointing drops it)
    needs_recurrent_cache_in_training: bool = False
    #: the abilities above; each built-in engine declares every one in its own class body (a subclass never
    #: inherits a claim unchecked), and the trainer decides from them alone (`trainer.engine_training_problem`)
    ABILITIES = ("reuses_sampling_pass", "applies_lm_head_outside_forward", "needs_recurrent_cache_in_training")

    @abstractmethod
    def scan(self, model: torch.nn.Module, docs: DocumentBatch) -> ScanOutput:
        """Teacher-forced no-grad pass: entropy, last hidden states and next-token log-probs."""

    @abstractmethod
    def generate(
        self,
        model: torch.nn.Module,
        docs: DocumentBatch,
        plan: RolloutPlan,
        generator: torch.Generator | None = None,
        train_model: torch.nn.Module | None = None,
        need_hidden: bool = True,
    ) -> RolloutOutput:
        """Sample G continuations of k tokens from every prefix (temperature 1, EOS does not stop; the tokens of
        ``plan.masked_token_ids`` are never drawn, ``old_logps`` are those of the unmasked distribution).

        With ``train_model`` (engines with ``reuses_sampling_pass`` only), the pass over the documents runs through
        ``train_model`` with gradients and is returned as ``RolloutOutput.sampling_pass`` for `forward_train`; the
        rollouts themselves are the same. ``need_hidden=False``: no reward reads the rollouts' hidden states, so
        ``RolloutOutput.hidden_states`` is None and the work that only computes them may be skipped."""

    @abstractmethod
    def forward_train(
        self,
        model: torch.nn.Module,
        docs: DocumentBatch,
        plan: RolloutPlan,
        completion_ids: torch.LongTensor,
        sampling_pass: Any = None,
    ) -> TrainForward:
        """Forward with gradients for the NTP term and the NSP term (gradient reaches the prefix).
        ``sampling_pass``: what ``generate(..., train_model=...)`` returned, reused instead of a second pass."""

    def fused_scan_problem(self, model: torch.nn.Module) -> str:
        """Why `fused_scan` cannot serve ``model`` ('' when it can)."""
        return f"the {self.name} engine has no fused scan"

    def fused_scan(
        self, model: torch.nn.Module, docs: DocumentBatch, train_model: torch.nn.Module
    ) -> tuple[ScanOutput, Any]:
        """The scan and the loss's document pass in one forward with gradients through ``train_model``
        (``nsp_fuse_scan``, with the sampling pass reused): returns the `ScanOutput` (detached) and what
        `generate_fused` continues from, once the positions are chosen from the scan's entropies."""
        raise NotImplementedError(self.fused_scan_problem(model))

    def generate_fused(
        self,
        model: torch.nn.Module,
        docs: DocumentBatch,
        plan: RolloutPlan,
        pending: Any,
        generator: torch.Generator | None = None,
        need_hidden: bool = True,
    ) -> RolloutOutput:
        """`generate` with ``train_model`` (the sampling pass reused), from the forward of `fused_scan` instead of a
        document pass of its own; the same rollouts and sampling pass."""
        raise NotImplementedError(self.fused_scan_problem(model))

    @classmethod
    def supports(cls, model: torch.nn.Module) -> tuple[bool, str]:
        """Whether this engine can run ``model``, and why not."""
        return True, ""

    @classmethod
    def options_problem(cls, *, checkpoint_segments: bool = False) -> str:
        """Why this engine cannot run with these engine options ('' when it can): `auto` then skips it, forcing it
        fails with this reason."""
        return ""

    @classmethod
    def auto_reason(cls, model: torch.nn.Module) -> str:
        """Why `auto` picks this engine for ``model`` (the log line), given that it supports it."""
        return f"{type(model).__name__} supports it"

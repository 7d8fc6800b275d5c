"""The generic engine: recompute every prefix. Works for any causal LM (fast-weight or attention).

It follows the official release: each of the B·n·G rollouts re-runs its whole prefix (left-padded) to sample, to
score (old log-probs and hidden states), and again with gradients for the loss. It is the correctness baseline that
faster engines are tested against.
"""

from __future__ import annotations

import torch

from trl_refine.modeling_utils import cache_kwargs, lm_head_logps, output_cache, score_tokens
from trl_refine.rollout.base import DocumentBatch, RolloutEngine, RolloutOutput, RolloutPlan, ScanOutput, TrainForward
from trl_refine.rollout.sampling import draw_noise, sample_from_logits


def prefix_rows(docs: DocumentBatch, plan: RolloutPlan, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, W] left-padded prefixes ``x[first : t + 1]`` of every rollout row, and their mask (W = longest)."""
    t = plan.row_positions()
    b = plan.row_documents()
    first = docs.first_valid[b]
    width = int((t + 1 - first).max())
    idx = (t + 1 - width)[:, None] + torch.arange(width, device=t.device)
    valid = idx >= first[:, None]
    ids = docs.input_ids[b[:, None], idx.clamp(min=0)].masked_fill(~valid, pad_token_id)
    return ids, valid.to(docs.attention_mask.dtype)


def teacher_forced_scan(model, docs: DocumentBatch) -> ScanOutput:
    """Step 1: one no-grad pass over the documents (entropy, next-token log-probs, last hidden states)."""
    logps, entropy, hidden = score_tokens(
        model, docs.input_ids, docs.attention_mask, docs.label_mask(), want_hidden=True
    )
    return ScanOutput(entropy=entropy.float(), hidden_states=hidden, logps=logps)


def scan_from_hidden(model, docs: DocumentBatch, hidden: torch.Tensor) -> ScanOutput:
    """`teacher_forced_scan`'s outputs from the [B, L, H] last hidden states of a forward that already ran (the
    one-pass engine's fused scan): the LM head over the labelled positions in chunks (`lm_head_logps`, never the full
    [tokens, vocab] logits), no gradients, ``hidden`` detached."""
    hidden = hidden.detach()
    with torch.no_grad():
        b, p = docs.label_mask().nonzero(as_tuple=True)
        logps, entropy = lm_head_logps(model, hidden[b, p], docs.input_ids[b, p + 1], want_entropy=True)
    shape = docs.input_ids.shape
    return ScanOutput(
        entropy=entropy.new_zeros(shape).index_put((b, p), entropy).float(),
        hidden_states=hidden,
        logps=logps.new_zeros(shape).index_put((b, p), logps),
    )


def _chunks(total: int, size: int | None):
    size = size or total
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


class GenericEngine(RolloutEngine):
    """Per-prefix recomputation (the official algorithm), for any causal LM."""

    name = "generic"
    reuses_sampling_pass = False
    applies_lm_head_outside_forward = False  # every log-prob comes from a model call (TRL's fused head)
    needs_recurrent_cache_in_training = False  # the loss re-reads [prefix; rollout] in full, no cache

    def __init__(self, rows_per_call: int | None = None, pad_token_id: int = 0):
        self.rows_per_call = rows_per_call
        self.pad_token_id = pad_token_id

    def scan(self, model, docs: DocumentBatch) -> ScanOutput:
        return teacher_forced_scan(model, docs)

    def generate(
        self, model, docs: DocumentBatch, plan: RolloutPlan, generator=None, train_model=None, need_hidden=True
    ) -> RolloutOutput:
        if train_model is not None:
            raise ValueError("the generic engine does not reuse its sampling pass for the loss (train_model)")
        k = plan.rollout_length
        prefix, prefix_mask = prefix_rows(docs, plan, self.pad_token_id)
        noise = draw_noise(prefix.size(0), k, generator, prefix.device)
        completions = []
        for rows in _chunks(prefix.size(0), self.rows_per_call):
            completions.append(
                self._sample(model, prefix[rows], prefix_mask[rows], noise[rows], k, plan.masked_token_ids)
            )
        completion_ids = torch.cat(completions)
        old_logps, hidden = [], []
        for rows in _chunks(prefix.size(0), self.rows_per_call):
            lp, _, hs = self._score_rollouts(
                model, prefix[rows], prefix_mask[rows], completion_ids[rows], hidden=need_hidden
            )
            old_logps.append(lp)
            hidden.append(hs)
        return RolloutOutput(completion_ids, torch.cat(old_logps).float(), torch.cat(hidden) if need_hidden else None)

    @staticmethod
    def _sample(model, ids, mask, noise, k, masked_token_ids=()) -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        tokens = []
        for i in range(k):
            tok = sample_from_logits(out.logits[:, -1], noise[:, i], masked_token_ids)
            tokens.append(tok)
            if i == k - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
            step = cache_kwargs(model, output_cache(out))
            if "cache_params" not in step:
                # transformers' Mamba / Mamba-2 decode without a mask, as their prepare_inputs_for_generation does
                # (MambaForCausalLM misreads a full-length one on a one-token step)
                step["attention_mask"] = mask
            out = model(input_ids=tok[:, None], use_cache=True, **step)
        return torch.stack(tokens, dim=1)

    @staticmethod
    def _score_rollouts(model, prefix, prefix_mask, completion_ids, hidden: bool):
        width, k = prefix.size(1), completion_ids.size(1)
        ids = torch.cat([prefix, completion_ids], dim=1)
        mask = torch.cat([prefix_mask, prefix_mask.new_ones(completion_ids.shape)], dim=1)
        score_mask = torch.zeros_like(ids, dtype=torch.bool)
        score_mask[:, width - 1 : width - 1 + k] = True
        logps, entropy, hs = score_tokens(model, ids, mask, score_mask, want_hidden=hidden)
        window = slice(width - 1, width - 1 + k)
        return logps[:, window], entropy[:, window], (hs[:, width : width + k] if hidden else None)

    def forward_train(
        self, model, docs: DocumentBatch, plan: RolloutPlan, completion_ids, sampling_pass=None
    ) -> TrainForward:
        if sampling_pass is not None:
            raise ValueError("the generic engine does not reuse its sampling pass for the loss (sampling_pass)")
        doc_logps, _, _ = score_tokens(model, docs.input_ids, docs.attention_mask, docs.label_mask())
        prefix, prefix_mask = prefix_rows(docs, plan, self.pad_token_id)
        logps, entropy, _ = self._score_rollouts(model, prefix, prefix_mask, completion_ids, hidden=False)
        return TrainForward(doc_logps=doc_logps, rollout_logps=logps, rollout_entropy=entropy.detach())

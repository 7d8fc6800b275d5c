"""The state-snapshot engine: one pass per document, branches from saved fast-weight states.

A fast-weight model's whole past is a fixed-size state. Instead of recomputing each of the n prefixes, the engine
runs the documents once in n+1 segments cut at the chosen positions, passing the cache along, and keeps the state
after each segment as that prefix's snapshot. Segment i of every document goes into one packed (``cu_seqlens``)
call, so the number of model calls per step is n+1 whatever the batch size. Rollouts branch from the snapshots,
expanded G times: the first token comes from the document's logits at the prefix end, then k-1 decode steps run
for all B·n·G branches together (plus one step that only reads the last token's hidden state).

For the loss the same segments run with gradients, followed by one branch call over ``[B·n·G, k-1]`` from the
differentiable snapshots, so the policy gradient reaches the prefix through the states; NTP log-probs come from the
same segmented pass. Log-probs are computed from captured hidden states in checkpointed chunks
(`lm_head_logps`), never as full ``[tokens, vocab]`` logits.

When one generation batch serves exactly one micro-step (``steps_per_generation = num_iterations = 1``), nothing
changes the weights between sampling and the loss, so the sampling segments can run with gradients and serve the
loss as well (``generate(..., train_model=...)`` → ``forward_train(..., sampling_pass=...)``): n+1 model calls
and one pass over the documents fewer per step, with the same rollouts, log-probs and gradients (the trainer's
``nsp_reuse_sampling_pass``).

Traps handled: HF gradient checkpointing would drop the cache (the trainer refuses it with this engine);
``use_cache=True`` is always passed with a cache; caches are always built from copies of snapshots (fla's
single-token no-grad conv step writes in place); snapshot tensors carrying gradients are autograd outputs, so
fla's fused_recurrent backward sees an ``initial_state`` that requires grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trl_refine._compat import tree_flatten, tree_unflatten
from trl_refine.modeling_utils import cache_kwargs, capture_last_hidden_state, lm_head_logps, output_cache, unwrap
from trl_refine.rollout.base import DocumentBatch, RolloutEngine, RolloutOutput, RolloutPlan, ScanOutput, TrainForward
from trl_refine.rollout.fsdp_head import fsdp2_owner_of_lm_head, hold_lm_head
from trl_refine.rollout.generic import teacher_forced_scan
from trl_refine.rollout.sampling import draw_noise, sample_from_logits
from trl_refine.rollout.state import State, state_adapter_for, unverified_reason


@dataclass
class SamplingPass:
    """The segmented pass of `SnapshotEngine.generate` run with gradients, kept for `forward_train`.

    Valid once, for the model that ran it, while its parameters are unchanged (`usable_by`): anything else (a
    recomputation on a stored batch, another model, weights updated in between) must run its own pass."""

    snapshots: list[State]
    doc_hidden: torch.Tensor  # [B, L, H], part of the graph
    model: torch.nn.Module
    param_versions: int  # sum of the parameters' in-place version counters when the pass ran
    used: bool = False

    def usable_by(self, model: torch.nn.Module) -> bool:
        return not self.used and model is self.model and _param_versions(model) == self.param_versions


def _param_versions(model: torch.nn.Module) -> int:
    return sum(p._version for p in model.parameters())


def check_reuse_allowed(train_model: torch.nn.Module | None) -> None:
    """Reusing the sampling pass for the loss keeps the LM head's weight in the graph from sampling to the backward,
    which FSDP2 does not allow."""
    if train_model is not None and fsdp2_owner_of_lm_head(train_model) is not None:
        raise ValueError(
            "reusing the sampling pass for the loss is not supported under FSDP2 (the LM-head group would have to "
            "stay gathered from sampling to the backward); set nsp_reuse_sampling_pass=False"
        )


class SnapshotEngine(RolloutEngine):
    """Segmented single pass + batched branch decoding from recurrent-state snapshots."""

    name = "snapshot"
    reuses_sampling_pass = True
    applies_lm_head_outside_forward = True
    needs_recurrent_cache_in_training = True

    def __init__(self, pad_token_id: int = 0, adapter=None, checkpoint_segments: bool = False):
        self.pad_token_id = pad_token_id
        self.adapter = adapter
        #: recompute each segment in the backward (activation memory of one segment instead of the document); the
        #: states enter and leave every checkpoint as explicit tensors, so they stay exact (unlike HF checkpointing)
        self.checkpoint_segments = checkpoint_segments

    @classmethod
    def supports(cls, model) -> tuple[bool, str]:
        adapter, why = state_adapter_for(unwrap(model))
        return adapter is not None, why

    @classmethod
    def unverified_reason(cls, model) -> str:
        """Why `auto` should not pick this engine for ``model`` although it runs it ('' when nothing stops it)."""
        return unverified_reason(unwrap(model))

    def _adapter(self, model):
        if self.adapter is None:
            adapter, why = state_adapter_for(unwrap(model))
            if adapter is None:
                raise ValueError(f"the snapshot engine cannot run {type(unwrap(model)).__name__}: {why}")
            self.adapter = adapter
        self.adapter.prepare(unwrap(model))
        return self.adapter

    # ------------------------------------------------------------------------------------------------------------------
    def scan(self, model, docs: DocumentBatch) -> ScanOutput:
        return teacher_forced_scan(model, docs)

    def document_pass(self, model, docs: DocumentBatch, plan: RolloutPlan) -> tuple[list[State], torch.Tensor]:
        """The pass over the documents that sampling and the loss branch from: the n snapshots (each a state with B
        rows, the state after the prefix ending at chunk j's position) and the [B, L, H] last hidden states. Here
        the segmented pass; the one-pass engine (`trl_refine.rollout.onepass`) computes the same in one call."""
        return self.segmented_pass(model, docs, plan)

    def segmented_pass(self, model, docs: DocumentBatch, plan: RolloutPlan) -> tuple[list[State], torch.Tensor]:
        """Run the n+1 segments of every document (packed per segment, always n+1 model calls, see
        `segment_calls`). Returns the n snapshots (each a state with B rows: the state after the prefix ending at chunk
        j's position) and the [B, L, H] last hidden states."""
        adapter = self._adapter(model)
        bsz, length = docs.input_ids.shape
        device = docs.input_ids.device
        first = docs.first_valid
        starts = torch.cat([first[:, None], plan.positions + 1], dim=1).tolist()
        ends = torch.cat([plan.positions + 1, torch.full_like(first[:, None], length)], dim=1).tolist()
        if adapter.packing == "serial":
            return self._serial_segmented_pass(model, docs, starts, ends)
        copy_states = not torch.is_grad_enabled()

        state: State | None = None
        snapshots: list[State] = []
        pieces = []
        calls = segment_calls(starts, ends)
        layouts = call_layouts(calls, length, device)
        flat_ids = docs.input_ids.reshape(-1)
        with capture_last_hidden_state(model) as store:
            for (call_starts, call_ends, num_snapshots), (active, active_t, cu, token_index) in zip(calls, layouts):
                ids = flat_ids.index_select(0, token_index)
                width = max(call_ends[b] - call_starts[b] for b in active)  # from the host: no GPU sync
                rows = None
                if state is not None:
                    rows = state
                    if len(active) < bsz or copy_states:
                        rows = adapter.select_rows(state, active_t)
                if self.checkpoint_segments and torch.is_grad_enabled():
                    seg_hidden, new_rows = self._checkpointed_segment(model, ids, cu, width, rows)
                else:
                    seg_hidden, new_rows = self._segment(model, ids, cu, width, rows, store)
                state = new_rows if len(active) == bsz else adapter.scatter_rows(state, active_t, new_rows)
                pieces.append(seg_hidden)
                snapshots.extend([state] * num_snapshots)
        hidden = torch.cat(pieces)
        flat_index = torch.cat([layout[3] for layout in layouts])
        doc_hidden = hidden.new_zeros(bsz * length, hidden.size(-1)).index_put((flat_index,), hidden)
        return snapshots, doc_hidden.view(bsz, length, -1)

    def _serial_segmented_pass(self, model, docs: DocumentBatch, starts, ends) -> tuple[list[State], torch.Tensor]:
        """`segmented_pass` one document per call (adapters that cannot pack rows, e.g. models with attention
        layers whose recurrent layers do not hold their state across padding): every document makes n+1 calls
        (`segment_calls` on it alone), B·(n+1) in all whatever the positions. Snapshots of different prefix lengths
        are concatenated by the adapter (attention K/V left-padded)."""
        adapter = self.adapter
        bsz, length = docs.input_ids.shape
        per_doc: list[list[State]] = []
        pieces, flat_index = [], []
        with capture_last_hidden_state(model) as store:
            for b in range(bsz):
                state, snaps = None, []
                for (s,), (e,), num_snapshots in segment_calls([starts[b]], [ends[b]]):
                    ids = docs.input_ids[b, s:e]
                    cu = torch.tensor([0, e - s], dtype=torch.int32)
                    if self.checkpoint_segments and torch.is_grad_enabled():
                        seg_hidden, state = self._checkpointed_segment(model, ids, cu, e - s, state)
                    else:
                        seg_hidden, state = self._segment(model, ids, cu, e - s, state, store)
                    pieces.append(seg_hidden)
                    flat_index.append(torch.arange(b * length + s, b * length + e))
                    snaps.extend([state] * num_snapshots)
                per_doc.append(snaps)
        snapshots = [adapter.concat([snaps[j] for snaps in per_doc]) for j in range(len(per_doc[0]))]
        hidden = torch.cat(pieces)
        index = torch.cat(flat_index).to(hidden.device)
        doc_hidden = hidden.new_zeros(bsz * length, hidden.size(-1)).index_put((index,), hidden)
        return snapshots, doc_hidden.view(bsz, length, -1)

    def _segment(self, model, ids, cu, width: int, rows: State | None, store) -> tuple[torch.Tensor, State]:
        """One call over the packed segment ``ids`` [Σ] (boundaries ``cu``); returns [Σ, H] hidden and new states."""
        if self.adapter.packing == "serial":  # one document: ids [T] continue ``rows`` (one row)
            cache = self.adapter.build_cache(rows) if rows is not None else self.adapter.empty_cache()
            extra = self.adapter.continuation_kwargs(rows, 0, width, ids.device)
            extra.update(cache_kwargs(model, cache))
            out = model(input_ids=ids[None], use_cache=True, logits_to_keep=1, **extra)
            return store["hidden"][0], self.adapter.snapshot(output_cache(out))
        cache = None if rows is None else self.adapter.build_cache(rows)
        if self.adapter.packing == "varlen":
            out = model(
                input_ids=ids[None], cu_seqlens=cu, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)
            )
            return store["hidden"][0], self.adapter.snapshot(output_cache(out))
        lens = (cu[1:] - cu[:-1]).long()
        col = torch.arange(width, device=ids.device)
        valid = col[None, :] >= (width - lens)[:, None]  # left padding
        src = (cu[:-1].long()[:, None] + col[None, :] - (width - lens)[:, None]).clamp(min=0)
        padded = torch.where(valid, ids[src.clamp(max=ids.numel() - 1)], torch.full_like(src, self.pad_token_id))
        out = model(
            input_ids=padded,
            attention_mask=valid.long(),
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
        # the packed tokens' rows of the padded output, gathered without a boolean mask (which would sync)
        token = torch.arange(ids.numel(), device=ids.device)
        row = torch.searchsorted(cu[1:].long(), token, right=True)
        flat = row * width + token - cu[:-1].long()[row] + (width - lens)[row]
        hidden = store["hidden"].reshape(-1, store["hidden"].size(-1)).index_select(0, flat)
        return hidden, self.adapter.snapshot(output_cache(out))

    def _checkpointed_segment(self, model, ids, cu, width: int, rows: State | None) -> tuple[torch.Tensor, State]:
        flat, spec = tree_flatten(rows) if rows is not None else ([], None)
        out_spec = []

        def run(*flat_rows):
            inner = tree_unflatten(list(flat_rows), spec) if spec is not None else None
            with capture_last_hidden_state(model) as store:
                hidden, new_rows = self._segment(model, ids, cu, width, inner, store)
            leaves, new_spec = tree_flatten(new_rows)
            out_spec[:] = [new_spec]
            return (hidden, *leaves)

        outs = torch.utils.checkpoint.checkpoint(run, *flat, use_reentrant=False)
        return outs[0], tree_unflatten(list(outs[1:]), out_spec[0])

    def _branch_rows(self, snapshots: list[State], plan: RolloutPlan) -> State:
        """States of all B·n·G rollout rows (doc → chunk → rollout), copied from the snapshots (the adapter may give
        the G rows of one prefix one shared copy of parts that no call writes, `FlaStateAdapter.branch_rows`)."""
        adapter = self.adapter
        bsz, n = plan.positions.shape
        stacked = adapter.concat(snapshots)  # row j * B + b
        device = plan.positions.device  # built where the states are: a host index would be copied once per tensor
        b = torch.arange(bsz, device=device).repeat_interleave(n)
        j = torch.arange(n, device=device).repeat(bsz)
        return adapter.branch_rows(stacked, j * bsz + b, plan.num_rollouts)

    @staticmethod
    def _prefix_end_hidden(doc_hidden: torch.Tensor, plan: RolloutPlan) -> torch.Tensor:
        """[B·n·G, H] hidden state at each row's last prefix token (predicts the first rollout token)."""
        return doc_hidden[plan.row_documents(), plan.row_positions()]

    # ------------------------------------------------------------------------------------------------------------------
    def generate(
        self, model, docs: DocumentBatch, plan: RolloutPlan, generator=None, train_model=None, need_hidden=True
    ) -> RolloutOutput:
        check_reuse_allowed(train_model)
        with hold_lm_head(model):
            return self._generate(model, docs, plan, generator, train_model, need_hidden)

    def _generate(
        self,
        model,
        docs: DocumentBatch,
        plan: RolloutPlan,
        generator,
        train_model,
        need_hidden: bool,
        document_pass=None,
    ):
        """``document_pass``: what gives the pass with gradients through ``train_model`` instead of
        `document_pass` (the one-pass engine's fused scan, whose forward already ran)."""
        sampling_pass = None
        if train_model is None:
            with torch.no_grad():
                snapshots, doc_hidden = self.document_pass(model, docs, plan)
        else:
            # the loss forward's document pass, run now: same segments and weights (no optimizer step comes between
            # sampling and the loss when a generation batch serves one micro-step), so forward_train reuses it
            with torch.enable_grad():
                snapshots, doc_hidden = (document_pass or self.document_pass)(train_model, docs, plan)
            sampling_pass = SamplingPass(snapshots, doc_hidden, train_model, _param_versions(train_model))
        with torch.no_grad():
            # a copy (index_select without grad): decoding updates the conv cache in place
            rows = self._branch_rows(snapshots, plan)
            cache = self.adapter.build_cache(rows)
            del snapshots  # kept by the sampling pass if it is reused, freed before decoding otherwise
            with self.adapter.branch_calls(model, rows):
                ids, logps, hidden = self._decode(
                    model, cache, rows, doc_hidden.detach(), plan, generator, need_hidden
                )
        return RolloutOutput(ids, logps, hidden, sampling_pass=sampling_pass)

    def _decode(
        self, model, cache, rows: State, doc_hidden: torch.Tensor, plan: RolloutPlan, generator, need_hidden: bool
    ):
        """k tokens for every rollout row from its branch ``cache``: the first from the document logits at the prefix
        end, then k-1 decode steps, plus one that only reads the last token's hidden state (skipped without
        ``need_hidden``)."""
        k = plan.rollout_length
        head = unwrap(model).get_output_embeddings()
        # the weight, not the module: a module call would be a partial forward of FSDP2's [norm, head] group
        hidden = self._prefix_end_hidden(doc_hidden, plan).to(head.weight.dtype)
        logits = torch.nn.functional.linear(hidden, head.weight, getattr(head, "bias", None)).float()
        noise = draw_noise(plan.num_rows, k, generator, logits.device)
        tokens, logps, hiddens = [], [], []
        with capture_last_hidden_state(model) as store:
            for i in range(k):
                tok = sample_from_logits(logits, noise[:, i], plan.masked_token_ids)
                tokens.append(tok)
                logps.append(torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1))
                if i == k - 1 and not need_hidden:
                    break  # that call would only give the last token's hidden state
                extra = self.adapter.continuation_kwargs(rows, i, 1, tok.device)
                out = model(input_ids=tok[:, None], use_cache=True, **extra, **cache_kwargs(model, cache))
                hiddens.append(store["hidden"][:, -1])
                cache = output_cache(out)
                logits = out.logits[:, -1].float()
        hidden = torch.stack(hiddens, 1) if need_hidden else None
        return torch.stack(tokens, 1), torch.stack(logps, 1), hidden

    def forward_train(
        self, model, docs: DocumentBatch, plan: RolloutPlan, completion_ids, sampling_pass=None
    ) -> TrainForward:
        with hold_lm_head(model) as hold:  # the head weight is read again when the backward recomputes the chunks
            out = self._forward_train(model, docs, plan, completion_ids, sampling_pass)
            hold.release_after_backward([out.doc_logps, out.rollout_logps])
        return out

    def _forward_train(
        self, model, docs: DocumentBatch, plan: RolloutPlan, completion_ids, sampling_pass: SamplingPass | None
    ) -> TrainForward:
        k = plan.rollout_length
        if sampling_pass is None:
            snapshots, doc_hidden = self.document_pass(model, docs, plan)
        else:
            if not sampling_pass.usable_by(model):
                raise ValueError(
                    "this sampling pass cannot serve the loss: it was already used, or ran on another model or "
                    "before the weights changed (check SamplingPass.usable_by(model) and pass sampling_pass=None)"
                )
            sampling_pass.used = True
            snapshots, doc_hidden = sampling_pass.snapshots, sampling_pass.doc_hidden
        bsz, length = docs.input_ids.shape
        b, p = docs.label_mask().nonzero(as_tuple=True)
        lp, _ = lm_head_logps(model, doc_hidden[b, p], docs.input_ids[b, p + 1])
        doc_logps = lp.new_zeros(bsz, length).index_put((b, p), lp)

        first_lp, first_ent = lm_head_logps(
            model, self._prefix_end_hidden(doc_hidden, plan), completion_ids[:, 0], want_entropy=True
        )
        logps, entropy = [first_lp[:, None]], [first_ent[:, None]]
        if k > 1:
            rows = self._branch_rows(snapshots, plan)
            cache = self.adapter.build_cache(rows)
            extra = self.adapter.continuation_kwargs(rows, 0, k - 1, completion_ids.device)
            with capture_last_hidden_state(model) as store, self.adapter.branch_calls(model, rows):
                model(
                    input_ids=completion_ids[:, :-1],
                    use_cache=True,
                    logits_to_keep=1,
                    **extra,
                    **cache_kwargs(model, cache),
                )
            hidden = store["hidden"]
            rows = completion_ids.size(0)
            rest_lp, rest_ent = lm_head_logps(
                model, hidden.reshape(-1, hidden.size(-1)), completion_ids[:, 1:].reshape(-1), want_entropy=True
            )
            logps.append(rest_lp.view(rows, k - 1))
            entropy.append(rest_ent.view(rows, k - 1))
        return TrainForward(
            doc_logps=doc_logps, rollout_logps=torch.cat(logps, 1), rollout_entropy=torch.cat(entropy, 1)
        )


def segment_calls(starts: list[list[int]], ends: list[list[int]]) -> list[tuple[list[int], list[int], int]]:
    """Group the per-document segments ``[starts[b][i], ends[b][i])`` (i = 0..n) into exactly n+1 model calls.

    Returns ``(call_starts, call_ends, snapshots_after)`` per call; every call has at least one non-empty document
    range, and ``snapshots_after`` counts the snapshots equal to the state after that call. A segment that is empty
    for every document (two chunks clamped to the same prefix, common in short documents) needs no call, but the
    number of calls must not depend on the data: FSDP and ZeRO-3 gather parameters inside every call, so a rank
    that made fewer calls than another would hang the job. Instead of skipping, the widest remaining call is cut in
    two (the state is carried across the cut, so the outputs are the same).
    """
    num_docs, num_segments = len(starts), len(starts[0])
    calls: list[list] = []
    for i in range(num_segments):
        seg_starts = [starts[b][i] for b in range(num_docs)]
        seg_ends = [ends[b][i] for b in range(num_docs)]
        snaps = 1 if i < num_segments - 1 else 0
        if any(e > s for s, e in zip(seg_starts, seg_ends)):
            calls.append([seg_starts, seg_ends, snaps])
        elif calls:
            calls[-1][2] += snaps  # same state as after the previous call
        else:
            raise ValueError("the first segment (document start to the first position) is empty")
    while len(calls) < num_segments:
        widths = [max(e - s for s, e in zip(c[0], c[1])) for c in calls]
        widest = max(range(len(calls)), key=widths.__getitem__)
        if widths[widest] < 2:
            raise ValueError(f"documents too short for {num_segments} segment calls")
        seg_starts, seg_ends, snaps = calls[widest]
        # first part ceil(len/2): every document active in the call stays active in its first part
        mid = [s + (e - s + 1) // 2 for s, e in zip(seg_starts, seg_ends)]
        calls[widest : widest + 1] = [[seg_starts, mid, 0], [mid, seg_ends, snaps]]
    return [tuple(c) for c in calls]


def call_layouts(
    calls: list[tuple[list[int], list[int], int]], length: int, device: torch.device
) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per segment call: the active documents (a list, and a tensor), ``cu_seqlens`` (int32) and the flat token index
    ``b * length + t`` of every packed token. Built on the host and moved to ``device`` in one copy per pass: one
    small copy per call would synchronise the host with the GPU 2(n+1) times per pass."""
    host: list[torch.Tensor] = []
    actives = []
    for call_starts, call_ends, _ in calls:
        active = [b for b in range(len(call_starts)) if call_ends[b] > call_starts[b]]
        lens = torch.tensor([call_ends[b] - call_starts[b] for b in active])
        cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        tokens = torch.cat([b * length + torch.arange(call_starts[b], call_ends[b]) for b in active])
        host.extend([torch.tensor(active), cu, tokens])
        actives.append(active)
    flat = torch.cat(host)
    flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    parts = iter(flat.split([t.numel() for t in host]))
    return [(active, next(parts), next(parts).to(torch.int32), next(parts)) for active in actives]

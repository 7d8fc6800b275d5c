"""The official release's ReFINE step, as a benchmark variant: the anchor of our speed claims.

It follows what the release's verl workers do for one inner (ReFINE) step, checked against
``verl/verl/trainer/ppo/ray_trainer.py::_inner_training_loop`` / ``prepare_ppo_batch_for_ttt``,
``verl/verl/workers/actor/dp_actor.py`` and ``verl/verl/workers/rollout/hf_rollout.py`` (princetonvisualai/ReFINE):

1. ``process_input_for_ttt``: eval mode, no grad, micro-batches of documents; one forward with
   ``output_hidden_states=True`` and full ``[B, L, V]`` logits; entropy from the logits.
2. ``prepare_ppo_batch_for_ttt``: one position per chunk; every prefix ``x[: t + 1]`` is left-padded to the full
   document width L, and the B·n prefixes are repeated G times (interleaved).
3. ``generate_sequences_for_ttt``: HF ``generate`` (sampling, top-k 0, top-p 1, ``min_new_tokens = max_new_tokens =
   k``, cache on) in micro-batches of 2 rows of the left-padded prefixes.
4. ``compute_log_prob_for_ttt``: no grad, micro-batches of 2; a forward of prefix + rollout (``use_cache=False``,
   ``output_hidden_states=True``, full logits) for the old log-probs and the rollouts' hidden states.
5. cosine reward against the scan's hidden states of the true continuation; GRPO advantages over the G rollouts.
6. ``update_policy_ppo_ttt``: train mode; the NTP loss (``labels=input_ids``) on the documents and then the PPO loss
   on prefix + rollout, both in micro-batches of 2 with a backward per micro-batch; gradient clipping; one
   optimizer step.

All of it runs under the caller's precision context (the release: fp32 master weights, bf16 autocast). The selection
uses our `select_positions` (the release's per-chunk loop computes the same distribution on the host; its cost is
negligible next to the model calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trl_refine.rollout import DocumentBatch
from trl_refine.selection import select_positions

#: the release's demo scripts: ttt_ppo_micro_batch_size_per_gpu = ttt_log_prob_micro_batch_size_per_gpu = 2
MICRO_BATCH = 2


def _entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits``: ``logsumexp(l) - sum(softmax(l) * l)``."""
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(-1)


def _logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def left_padded_prefixes(docs: DocumentBatch, positions: torch.Tensor, g: int, pad_token_id: int = 0):
    """[B·n·G, L] prefixes ``x[: t + 1]`` left-padded to the document width (as ``prepare_ppo_batch_for_ttt``), their
    mask, and the row → (document, position) maps. Rows are ordered document → chunk → rollout."""
    bsz, length = docs.input_ids.shape
    t = positions.reshape(-1)  # [B·n]
    b = torch.arange(bsz, device=t.device).repeat_interleave(positions.size(1))
    shift = length - (t + 1)  # the prefix ends in the last column
    src = torch.arange(length, device=t.device)[None, :] - shift[:, None]
    valid = src >= 0
    ids = docs.input_ids[b[:, None], src.clamp(min=0)].masked_fill(~valid, pad_token_id)
    mask = docs.attention_mask[b[:, None], src.clamp(min=0)] * valid
    rep = lambda x: x.repeat_interleave(g, dim=0)  # noqa: E731
    return rep(ids), rep(mask), rep(b), rep(t)


def official_step(
    micro_batch: int = MICRO_BATCH, margin: int = 20, clip: float = 0.2, grad_clip: float = 1.0, mark=None
):
    """A bench step function ``step(model, opt, docs, n, g, k)`` doing the release's procedure (module docstring).
    ``mark(phase)`` is called at the end of each phase."""
    mark = mark or (lambda _phase: None)

    def step(model, opt, docs: DocumentBatch, n, g, k):
        from transformers import GenerationConfig

        bsz, length = docs.input_ids.shape
        device = docs.input_ids.device
        # 1. scan
        model.eval()
        entropies, hiddens = [], []
        with torch.no_grad():
            for s in range(0, bsz, micro_batch):
                out = model(
                    input_ids=docs.input_ids[s : s + micro_batch],
                    attention_mask=docs.attention_mask[s : s + micro_batch],
                    output_hidden_states=True,
                )
                entropies.append(_entropy_from_logits(out.logits.float()))
                hiddens.append(out.hidden_states[-1])
                del out
        entropy, hidden = torch.cat(entropies), torch.cat(hiddens)
        mark("scan (no grad, full logits)")
        # 2. selection and the left-padded prefixes
        positions = select_positions(
            entropy,
            docs.attention_mask,
            num_chunks=n,
            rollout_length=k,
            margin=margin,
            generator=torch.Generator(device=device).manual_seed(0),
        )
        prefix, prefix_mask, row_doc, row_pos = left_padded_prefixes(docs, positions, g)
        rows = prefix.size(0)
        offsets = torch.arange(1, k + 1, device=device)
        truth_hidden = hidden[row_doc[:, None], row_pos[:, None] + offsets]
        mark("select + prefixes")
        # 3. HF generate on micro-batches of 2 rows
        gen_cfg = GenerationConfig(
            do_sample=True, num_beams=1, top_k=0, top_p=1.0, temperature=1.0, num_return_sequences=1
        )
        seqs = []
        with torch.no_grad():
            for s in range(0, rows, micro_batch):
                seqs.append(
                    model.generate(
                        input_ids=prefix[s : s + micro_batch],
                        attention_mask=prefix_mask[s : s + micro_batch],
                        min_new_tokens=k,
                        max_new_tokens=k,
                        eos_token_id=None,
                        pad_token_id=0,
                        generation_config=gen_cfg,
                        use_cache=True,
                    )
                )
        seq = torch.cat(seqs)  # [R, L + k]
        seq_mask = torch.cat([prefix_mask, prefix_mask.new_ones(rows, k)], dim=1)
        response = seq[:, length:]
        mark("generate (HF, micro-batches of 2)")
        # 4. old log-probs and hidden states: a no-grad forward of prefix + rollout
        old_logps, roll_hidden = [], []
        with torch.no_grad():
            for s in range(0, rows, micro_batch):
                out = model(
                    input_ids=seq[s : s + micro_batch],
                    attention_mask=seq_mask[s : s + micro_batch],
                    use_cache=False,
                    output_hidden_states=True,
                )
                logits = out.logits[:, -k - 1 : -1]
                old_logps.append(_logprobs_from_logits(logits, response[s : s + micro_batch]))
                roll_hidden.append(out.hidden_states[-1][:, -k:])
                del out, logits
        old_logps, roll_hidden = torch.cat(old_logps), torch.cat(roll_hidden)
        mark("old log-probs + hidden states (no grad)")
        # 5. reward and GRPO advantages
        reward = F.cosine_similarity(roll_hidden.float(), truth_hidden.float(), dim=-1).mean(-1)
        grouped = reward.view(-1, g)
        adv = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True).nan_to_num(0) + 1e-6)
        adv = adv.flatten()
        mark("reward + advantages")
        # 6. update: NTP micro-batches, then PPO micro-batches, a backward each; one optimizer step
        model.train()
        opt.zero_grad(set_to_none=True)
        doc_micro = list(range(0, bsz, micro_batch))
        for s in doc_micro:
            ids = docs.input_ids[s : s + micro_batch]
            labels = ids.masked_fill(docs.attention_mask[s : s + micro_batch] == 0, -100)
            out = model(input_ids=ids, attention_mask=docs.attention_mask[s : s + micro_batch], labels=labels)
            (out.loss / len(doc_micro)).backward()
            del out
        mark("NTP forward + backward (micro-batches)")
        ppo_micro = list(range(0, rows, micro_batch))
        for s in ppo_micro:
            out = model(
                input_ids=seq[s : s + micro_batch], attention_mask=seq_mask[s : s + micro_batch], use_cache=False
            )
            logps = _logprobs_from_logits(out.logits[:, -k - 1 : -1], response[s : s + micro_batch])
            ratio = torch.exp(logps - old_logps[s : s + micro_batch])
            a = adv[s : s + micro_batch, None]
            pg = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
            (pg / len(ppo_micro)).backward()
            del out, logps
        mark("PPO forward + backward (micro-batches)")
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")

    return step

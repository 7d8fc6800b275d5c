"""One ReFINE step, once: selection → rollouts → reward inputs → rewards → advantages.

`NSPGRPOTrainer` (mid- and post-training, through TRL's reward and loss machinery) and `TestTimeRefine`
(test-time training, a plain loop) both call these functions, so a change to the algorithm lands in one place:

* `sample_rollouts`: engine scan (or the fused scan, ``nsp_fuse_scan``), position selection, `RolloutPlan` (EOS
  masked unless ``nsp_sample_eos``), engine rollouts;
* `reward_rows` / `reward_call_args`: what every reward function receives, per rollout;
* `hidden_states_needed`: the rule for computing rollout hidden states (`rewards` module docstring);
* `score_rewards`: the weighted sum of reward functions (built-in dispatch is `rewards.builtin_reward_funcs`);
* `step_advantages`: GRPO advantages over the configured groups;
* `rollout_generators`: the two random streams (selection, sampling) of one step from one integer seed;
* `sampling_pass_reuse_problem`: whether the loss may reuse the engine's sampling pass, and why not;
* `plain_ntp_terms`: the NTP term alone (``nsp_coef = 0``: no scan, selection, rollouts or rewards at all);
* `padded_ntp_terms`: the NTP term with the padding counted (``ntp_count_pad_targets``, the release's fla loss).

The loss terms are the engine's ``forward_train`` log-probs fed to `losses.masked_token_nll` (NTP) and to PPO-clip:
TRL's ``_compute_loss`` in the trainer (every TRL loss type), `losses.ppo_clip_loss` at test time (the same
function for ``loss_type="bnpo"``, ``delta=3``; `tests/test_faithfulness.py` checks both give the same values).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trl_refine.advantages import group_advantages
from trl_refine.config import RefineFields
from trl_refine.losses import masked_token_nll
from trl_refine.modeling_utils import backbone_of, capture_last_hidden_state, score_tokens, unwrap
from trl_refine.reward_checks import check_reward_output
from trl_refine.rewards import has_custom_rewards, needs_hidden_states
from trl_refine.rollout.base import DocumentBatch, RolloutEngine, RolloutOutput, RolloutPlan, ScanOutput
from trl_refine.rollout.fsdp_head import fsdp2_owner_of_lm_head
from trl_refine.rollout.sampling import masked_rollout_tokens
from trl_refine.selection import select_positions

__all__ = [
    "REWARD_ROW_KEYS",
    "SampledStep",
    "combine_rewards",
    "hidden_states_needed",
    "hidden_states_problem",
    "masked_rollout_tokens",
    "padded_ntp_terms",
    "plain_ntp_terms",
    "reward_call_args",
    "reward_rows",
    "rollout_generators",
    "sample_rollouts",
    "sampling_pass_reuse_problem",
    "score_rewards",
    "step_advantages",
]


@dataclass
class SampledStep:
    """What the no-grad half of a ReFINE step produced for a batch of documents."""

    docs: DocumentBatch
    scan: ScanOutput
    positions: torch.LongTensor  # [B, n]
    plan: RolloutPlan
    rollout: RolloutOutput

    @property
    def ground_truth_ids(self) -> torch.LongTensor:
        return self.plan.ground_truth(self.docs)


def rollout_generators(seed: int, device: torch.device | str) -> tuple[torch.Generator, torch.Generator]:
    """The selection and the sampling generator of one step, both functions of ``seed`` only."""
    gens = []
    for stream in range(2):
        gen = torch.Generator(device=device)
        gen.manual_seed((seed + stream) % 2**63)
        gens.append(gen)
    return gens[0], gens[1]


def sample_rollouts(
    engine: RolloutEngine,
    model: torch.nn.Module,
    docs: DocumentBatch,
    fields: RefineFields,
    *,
    generators: tuple[torch.Generator | None, torch.Generator | None],
    masked_token_ids: tuple[int, ...] = (),
    train_model: torch.nn.Module | None = None,
    need_hidden: bool = True,
) -> SampledStep:
    """Scan the documents, select n positions each, and sample G rollouts of k tokens per position (no grad).

    With ``train_model`` (the sampling pass reused for the loss), ``nsp_fuse_scan`` and an engine whose fused scan
    serves the model, the scan comes from the loss's document forward (`RolloutEngine.fused_scan`): one document
    forward instead of two, the same positions, rollouts and sampling pass."""
    pending = None
    if train_model is not None and fields.nsp_fuse_scan and not engine.fused_scan_problem(train_model):
        scan, pending = engine.fused_scan(model, docs, train_model)
    with torch.no_grad():
        if pending is None:
            scan = engine.scan(model, docs)
        positions = select_positions(
            torch.nan_to_num(scan.entropy, nan=0.0, posinf=0.0, neginf=0.0),  # non-finite: the trainer's guard stops
            docs.attention_mask,
            num_chunks=fields.nsp_num_chunks,
            rollout_length=fields.nsp_rollout_length,
            margin=fields.nsp_margin,
            strategy=fields.nsp_selection,
            smoothing_width=fields.smoothing_width,
            temperature=fields.nsp_selection_temperature,
            generator=generators[0],
        )
        plan = RolloutPlan(positions, fields.nsp_num_rollouts, fields.nsp_rollout_length, masked_token_ids)
        if pending is None:
            rollout = engine.generate(
                model, docs, plan, generators[1], train_model=train_model, need_hidden=need_hidden
            )
        else:
            rollout = engine.generate_fused(model, docs, plan, pending, generators[1], need_hidden=need_hidden)
    return SampledStep(docs, scan, positions, plan, rollout)


def reward_rows(step: SampledStep, tokenizer, *, tail_tokens: int, need_hidden: bool) -> dict[str, Any]:
    """Everything a reward function gets, per rollout: ``prompts`` (the decoded last ``tail_tokens`` prefix tokens),
    ``completions``, ``completion_ids`` and, as per-rollout lists, ``prefix_ids``, ``ground_truth_ids``,
    ``ground_truth_text``, ``rollout_hidden_states``, ``ground_truth_hidden_states`` (None without ``need_hidden``),
    ``prefix_position``, ``chunk_index`` and ``document_index``."""
    docs, plan = step.docs, step.plan
    n, g = plan.num_chunks, plan.num_rollouts
    truth_ids = step.ground_truth_ids
    completion_ids = step.rollout.completion_ids
    row_pos, row_doc = plan.row_positions().tolist(), plan.row_documents().tolist()
    first = docs.first_valid.tolist()
    prefix_ids = [docs.input_ids[b, first[b] : t + 1] for b, t in zip(row_doc, row_pos)]
    hidden = need_hidden and step.rollout.hidden_states is not None
    truth_hidden = plan.ground_truth_hidden(step.scan) if hidden else None
    return {
        "prompts": tokenizer.batch_decode(
            [p[-tail_tokens:] if tail_tokens else p[:0] for p in prefix_ids], skip_special_tokens=True
        ),
        "completions": tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        "completion_ids": completion_ids.tolist(),
        "prefix_ids": prefix_ids,
        "ground_truth_ids": list(truth_ids),
        "ground_truth_text": tokenizer.batch_decode(truth_ids, skip_special_tokens=True),
        "rollout_hidden_states": list(step.rollout.hidden_states) if hidden else [None] * plan.num_rows,
        "ground_truth_hidden_states": list(truth_hidden) if hidden else [None] * plan.num_rows,
        "prefix_position": [t - first[b] for b, t in zip(row_doc, row_pos)],
        "chunk_index": [(r // g) % n for r in range(plan.num_rows)],
        "document_index": row_doc,
    }


#: the per-rollout keyword arguments of `reward_rows` (besides prompts / completions / completion_ids)
REWARD_ROW_KEYS = (
    "prefix_ids",
    "ground_truth_ids",
    "ground_truth_text",
    "rollout_hidden_states",
    "ground_truth_hidden_states",
    "prefix_position",
    "chunk_index",
    "document_index",
)


def reward_call_args(rows: dict[str, Any]) -> tuple[list[str], list[str], list[list[int]], dict[str, list]]:
    """``(prompts, completions, completion_ids, kwargs)`` for ``f(prompts, completions, completion_ids, **kwargs)``."""
    return rows["prompts"], rows["completions"], rows["completion_ids"], {k: rows[k] for k in REWARD_ROW_KEYS}


def score_rewards(
    reward_funcs: Sequence[Callable], weights: Sequence[float], rows: dict[str, Any], device
) -> torch.Tensor:
    """[R] weighted sum of the reward functions (None → NaN: unscorable; a row NaN for every function stays NaN).

    The trainer sums through TRL's ``_calculate_rewards`` (reward models, per-function logging) with the same rule;
    this is the loop for code without a ``Trainer``."""
    prompts, completions, completion_ids, kwargs = reward_call_args(rows)
    per_func = []
    for fn in reward_funcs:
        values = fn(prompts, completions, completion_ids, **kwargs)
        values = check_reward_output(getattr(fn, "__name__", type(fn).__name__), values, len(completion_ids))
        per_func.append(torch.tensor([math.nan if v is None else float(v) for v in values], device=device))
    return combine_rewards(torch.stack(per_func, dim=1), torch.as_tensor(list(weights), device=device))


def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[R, F] rewards and [F] weights → [R] weighted sums, NaN-skipping; NaN where every function gave NaN."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    total = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    total[unscorable] = torch.nan
    return total


def step_advantages(
    rewards: torch.Tensor, fields: RefineFields, scale: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages of the gathered rewards over the configured groups (`RefineFields.group_size`)."""
    return group_advantages(rewards, fields.group_size, scale=scale)


def hidden_states_needed(reward_funcs: Sequence[Callable], model: torch.nn.Module, device=None) -> bool:
    """The hidden-states rule: the built-in cosine / hybrid rewards (and callables marked ``needs_hidden_states``)
    require them (error if the model cannot give them); other custom rewards get them when the model provides them;
    the built-in exact reward alone computes none."""
    if needs_hidden_states(reward_funcs):
        problem = hidden_states_problem(model, device)
        if problem is not None:
            raise ValueError(f"{problem}. Use nsp_reward='exact' or pass reward_funcs that do not read hidden states.")
        return True
    if has_custom_rewards(reward_funcs):
        return hidden_states_problem(model, device) is None
    return False


def hidden_states_problem(model: torch.nn.Module, device: torch.device | None = None) -> str | None:
    """Why the model cannot expose last-layer hidden states, or None if it can.

    The probe forward runs only where the weights already are on ``device`` (the run's device): under FSDP and
    DeepSpeed the model is still on the CPU when the trainer is built, and GPU-only kernels (fla) cannot run there;
    then only the structure is checked here."""
    base = unwrap(model)
    if backbone_of(base) is base:
        return (
            f"{type(base).__name__} has no separate backbone (`base_model`), so its last-layer hidden states cannot be "
            "captured for the cosine reward"
        )
    param = next(base.parameters(), None)
    if param is None or param.device.type == "meta" or hasattr(param, "ds_id"):
        return None  # no weights to run yet (meta device, or partitioned by DeepSpeed ZeRO-3's zero.Init at load time)
    if device is not None and param.device.type != torch.device(device).type:
        return None  # not placed yet (FSDP / DeepSpeed move the model later)
    probe = torch.zeros((1, 2), dtype=torch.long, device=param.device)
    with torch.no_grad(), capture_last_hidden_state(base) as store:
        base(input_ids=probe)
    hidden = store.get("hidden")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != probe.shape:
        return (
            f"{type(base).__name__}'s backbone does not return last-layer hidden states of shape [batch, length, "
            f"hidden] (got {type(hidden).__name__})"
        )
    return None


def sampling_pass_reuse_problem(
    fields: RefineFields, engine: RolloutEngine, model: torch.nn.Module, *, single_use: str | None = None
) -> str | None:
    """Why the loss may not reuse the engine's sampling pass (`nsp_reuse_sampling_pass`), or None if it may.

    ``single_use``: the caller's reason why one sampling pass would serve more than one loss forward, or with
    weights changed in between (None when it serves exactly one, right after sampling)."""
    if not fields.nsp_reuse_sampling_pass:
        return "nsp_reuse_sampling_pass=False"
    if not engine.reuses_sampling_pass:
        return f"the {engine.name} engine does not reuse its sampling pass"
    if single_use is not None:
        return single_use
    if fsdp2_owner_of_lm_head(model) is not None:
        return "the model is sharded by FSDP2"
    return None


def plain_ntp_terms(model: torch.nn.Module, docs: DocumentBatch) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(Σ NLL, label count)`` of each document's next-token predictions, from one plain forward per document
    without its padding (with gradients if enabled): the NTP term of a run with ``nsp_coef = 0``, which needs no
    engine. One forward per document on every process, so FSDP / ZeRO-3 collectives stay in step."""
    for b in range(docs.batch_size):
        first = int(docs.first_valid[b])
        doc = DocumentBatch(docs.input_ids[b : b + 1, first:], docs.attention_mask[b : b + 1, first:])
        label_mask = doc.label_mask()
        logps, _, _ = score_tokens(model, doc.input_ids, doc.attention_mask, label_mask)
        yield masked_token_nll(logps, label_mask)


def padded_ntp_terms(model: torch.nn.Module, docs: DocumentBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ NLL, position count)`` over every position of the left-padded batch but the last, pad tokens counted
    as inputs and as targets: the loss of the release's fla ``DeltaNetForCausalLM`` with ``labels=input_ids``
    (no pad masking), the NTP term under ``ntp_count_pad_targets``. One forward over the whole batch."""
    scored = torch.ones_like(docs.attention_mask, dtype=torch.bool)
    scored[:, -1] = False
    logps, _, _ = score_tokens(model, docs.input_ids, docs.attention_mask, scored)
    return masked_token_nll(logps, scored)

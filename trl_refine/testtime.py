"""Test-time training with ReFINE: adapt on each test prompt, answer greedily, restore the weights.

A small loop over the pure pieces (engine scan / generate / forward_train, `select_positions`, the rewards,
`group_advantages`, `ppo_clip_loss`) with a plain ``torch.optim.AdamW``; no ``Trainer``. Defaults follow the
official test-time release (research/paper.md §2): exact-match reward, loss = 1.0·NTP + 0.4·PPO-clip (ε = 0.2,
dual clip 3, token mean), n = 8 positions, k = 5 tokens, G = 1, lr 1e-6, weight decay 0.01, gradient clip 1.0.

Unlike the official code, the weights are restored bit-exactly after every batch by default (``reset="batch"``), so
no adaptation leaks from one test example into the next; ``reset="never"`` (``restore=False``) keeps adapting
across the test set with one optimizer, as the release does.

    from trl_refine import test_time_refine
    answers = test_time_refine(model, tokenizer, prompts, steps=1)        # list of greedy answers

    from trl_refine.testtime import TestTimeRefine
    from trl_refine.eval import evaluate
    result = evaluate(model, tokenizer, "trec_16384.parquet", adapt=TestTimeRefine(steps=1), batch_size=1)

Works with full fine-tuning and with PEFT/LoRA models (only parameters with ``requires_grad`` are trained and
restored; wrap the model with ``peft.get_peft_model`` first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trl_refine.config import RefineFields, check_batch_ranges, check_field_types
from trl_refine.kernels.fla_gated_choice import fla_gated_kernel_block, resolve_fla_gated_kernel
from trl_refine.losses import CLIP_EPSILON, DUAL_CLIP, masked_token_nll, ppo_clip_loss
from trl_refine.modeling_utils import fused_lm_head, unwrap
from trl_refine.precision import warn_if_updates_vanish
from trl_refine.rewards import builtin_reward_funcs
from trl_refine.rollout.base import DocumentBatch, RolloutEngine, RolloutPlan
from trl_refine.rollout.registry import build_engine
from trl_refine.rollout.sampling import masked_rollout_tokens
from trl_refine.step import (
    hidden_states_needed,
    padded_ntp_terms,
    plain_ntp_terms,
    reward_rows,
    rollout_generators,
    sample_rollouts,
    sampling_pass_reuse_problem,
    score_rewards,
    step_advantages,
)
from trl_refine.utils import left_pad, model_device, restoring, truncate_middle

logger = logging.getLogger("trl_refine")

__all__ = ["TestTimeConfig", "TestTimeRefine", "test_time_adaptation", "test_time_refine"]

RESETS = ("batch", "never")
#: what one rollout round covers: the adaptation batch (the release) or each mini-batch
ROLLOUT_UNITS = ("batch", "mini_batch")
#: fields of an NSPGRPOConfig / GRPOConfig that mean the same at test time (besides the nsp_* / ntp_* ones)
_SHARED_TRAINING_FIELDS = (
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "epsilon",
    "epsilon_high",
    "scale_rewards",
    "seed",
    "fla_gated_kernel",
)
SHORT_PROMPT_POLICIES = ("skip", "error")
PRECISIONS = ("bf16", "fp16")


@dataclass
class TestTimeConfig(RefineFields):
    """Every knob of test-time ReFINE: the ReFINE step's fields (`RefineFields`, shared with `NSPGRPOConfig`) plus
    the optimizer, batching and restore options of the adaptation loop."""

    __test__ = False  # not a pytest test class, despite the name

    steps: int = field(default=1, metadata={"help": "m: ReFINE passes over each adaptation batch before answering."})
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW lr (official 1e-6 for 1B-scale models)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (official 0.01)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 = off; official 1.0)."})
    mini_batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts per optimizer step within a batch (official: 4 of 8); None = the whole batch."},
    )
    rollouts_per: str = field(
        default="batch",
        metadata={
            "help": "batch: one rollout round for the whole batch, then its mini-batch steps (later ones "
            "off-policy), as the release; mini_batch: each mini-batch samples its own rollouts (on-policy)."
        },
    )
    # the ReFINE step's fields come from RefineFields; these defaults differ at test time (official release)
    nsp_reward: str = field(default="exact", metadata={"help": "exact (official at test time), cosine or hybrid."})
    nsp_coef: float = field(default=0.4, metadata={"help": "Weight of the PPO-clip term (official 0.4 at test time)."})
    scale_rewards: str = field(default="group", metadata={"help": "Advantage scaling: group, batch or none."})
    epsilon: float = field(default=CLIP_EPSILON, metadata={"help": "PPO clip ε (low; also high unless set)."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clip ε; None = epsilon."})
    dual_clip: float | None = field(default=DUAL_CLIP, metadata={"help": "Dual-clip c for A < 0; None = off."})
    reset: str = field(
        default="batch",
        metadata={"help": "batch: restore the weights after each batch (default); never: keep adapting (official)."},
    )
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={"help": "Longer prompts keep their first and last half (as the evaluator's middle truncation)."},
    )
    add_special_tokens: bool = field(default=False, metadata={"help": "Tokenize prompts with special tokens."})
    short_prompts: str = field(
        default="skip",
        metadata={"help": "Prompts shorter than margin + n·k + max(k, margin) tokens: skip (not adapted) or error."},
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "Autocast dtype for the adaptation: bf16, fp16 or None (model dtype)."}
    )
    seed: int = field(default=0, metadata={"help": "Randomness is a function of (seed, prompt text, step)."})

    def __post_init__(self):
        def choice(name: str, allowed: Sequence[str]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")

        check_field_types(self)
        check_batch_ranges(self)
        self.validate_refine()
        choice("reset", RESETS)
        choice("rollouts_per", ROLLOUT_UNITS)
        choice("short_prompts", SHORT_PROMPT_POLICIES)
        choice("scale_rewards", ("group", "batch", "none"))
        if self.mixed_precision is not None:
            choice("mixed_precision", PRECISIONS)
        for name in ("steps",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError("mini_batch_size must be >= 1 or None.")
        if self.learning_rate < 0:
            raise ValueError("learning_rate must be >= 0.")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < self.min_prompt_length:
            raise ValueError(f"max_prompt_tokens must be >= the minimum prompt length {self.min_prompt_length}.")

    @property
    def min_prompt_length(self) -> int:
        """Fewest prompt tokens test-time ReFINE adapts on (`RefineFields.min_document_length`)."""
        return self.min_document_length

    @classmethod
    def from_any(cls, config: Any = None, **overrides) -> TestTimeConfig:
        """A config from None, a `TestTimeConfig`, a mapping, or any object with same-named attributes (e.g. an
        `NSPGRPOConfig`: its ReFINE fields (reward and coefficients included, so set them for test time), learning
        rate, weight decay, Adam settings, gradient clipping, PPO clip range, ``delta`` as the dual clip, advantage
        scaling and seed carry over; nothing else). ``overrides`` (not None) win."""
        names = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, Any] = {}
        if isinstance(config, cls):
            values = dataclasses.asdict(config)
        elif isinstance(config, dict):
            unknown = sorted(set(config) - set(names))
            if unknown:
                raise ValueError(f"unknown test-time config fields {unknown}; known: {names}")
            values = dict(config)
        elif config is not None:
            shared = [n for n in names if n.startswith(("nsp_", "ntp_")) or n in _SHARED_TRAINING_FIELDS]
            values = {name: getattr(config, name) for name in shared if hasattr(config, name)}
            if isinstance(values.get("scale_rewards"), bool):
                values["scale_rewards"] = "group" if values["scale_rewards"] else "none"
            if getattr(config, "delta", None) is not None:
                values["dual_clip"] = config.delta
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise TypeError(f"unknown test-time options {unknown}; known: {names}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------------
# weights: snapshot and exact restore
# ----------------------------------------------------------------------------------------------------------------


def _stable_seed(seed: int, texts: Sequence[str], step: int) -> int:
    crc = zlib.crc32("\x1f".join(texts).encode("utf-8"))
    return ((seed * 1_000_003 + crc) * 1024 + step * 4) % (2**62)


# ----------------------------------------------------------------------------------------------------------------
# the adapt hook
# ----------------------------------------------------------------------------------------------------------------


class TestTimeRefine:
    """Test-time ReFINE as the evaluator's ``adapt`` hook: ``hook(model, tokenizer, prompts)`` returns a context
    manager that adapts on the prompts on entry and (with ``reset="batch"``) restores the weights on exit.

    Args:
        config: a `TestTimeConfig`, a dict, an `NSPGRPOConfig`-like object or None (defaults).
        reward_funcs: optional TRL-style reward callables ``f(prompts, completions, completion_ids, **kw)`` used
            instead of ``nsp_reward``; they receive ``prefix_ids``, ``ground_truth_ids``, ``ground_truth_text``,
            ``rollout_hidden_states``, ``ground_truth_hidden_states``, ``prefix_position``, ``chunk_index`` and
            ``document_index`` as lists, one per rollout.
        reward_weights: weights of ``reward_funcs`` (default 1 each).
        engine: a `RolloutEngine` instance or name (default ``nsp_engine``).
        **overrides: any `TestTimeConfig` field (e.g. ``steps=2``, ``learning_rate=1e-5``).

    ``history`` collects one stats dict per adapted batch (loss terms, reward, grad norm, skipped prompts).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        config: Any = None,
        *,
        reward_funcs: Sequence[Callable] | None = None,
        reward_weights: Sequence[float] | None = None,
        engine: RolloutEngine | str | None = None,
        **overrides,
    ):
        self.config = TestTimeConfig.from_any(config, **overrides)
        self.reward_funcs = list(reward_funcs) if reward_funcs else None
        if reward_weights is not None and (self.reward_funcs is None or len(reward_weights) != len(self.reward_funcs)):
            raise ValueError("reward_weights needs one weight per reward function")
        self.reward_weights = list(reward_weights) if reward_weights is not None else None
        self._engine_arg = engine
        self._engine: RolloutEngine | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_model: int | None = None
        self._precision_checked_for: int | None = None  # the model whose weight precision was checked (warned once)
        self._hidden_decided_for: int | None = None  # the model the hidden-states rule was applied to
        self._hidden = False
        self._kernel_decided_for: int | None = None  # the model fla_gated_kernel was resolved for
        self._kernel = "fla"
        self.history: list[dict[str, Any]] = []

    # -- public --------------------------------------------------------------------------------------------------------
    def __call__(self, model, tokenizer, prompts: Sequence[str]) -> contextlib.AbstractContextManager:
        return self.adapting(model, tokenizer, prompts)

    @contextlib.contextmanager
    def adapting(self, model, tokenizer, prompts: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Adapt on ``prompts``, yield the stats, then restore (``reset="batch"``) and reset the train flag. The
        caller's block (the evaluator's answers) runs inside `kernel_block` too, as the adaptation does."""
        restore = self.config.reset == "batch"
        with self.kernel_block(model), restoring(model, "trainable" if restore else "none"):
            try:
                yield self.adapt(model, tokenizer, prompts)
            finally:
                if restore:
                    self._optimizer = None  # fresh AdamW state for the next batch

    def reset_state(self) -> None:
        """Forget the optimizer state kept across batches by ``reset="never"``."""
        self._optimizer = None

    def summary(self) -> dict[str, Any]:
        """What the adaptation did so far: batches, optimizer steps, skipped prompts, and per step index (the i-th
        optimizer step of each batch) the mean of each stat over the batches, NaNs (e.g. the NTP-only arm's reward)
        left out, so a run's log shows its losses and rewards move from the first step to the last."""
        per_index: dict[int, dict[str, list[float]]] = {}
        for batch in self.history:
            for i, step in enumerate(batch["steps"]):
                for key, value in step.items():
                    per_index.setdefault(i, {}).setdefault(key, []).append(float(value))

        def mean(values: list[float]) -> float:
            finite = [v for v in values if math.isfinite(v)]
            return sum(finite) / len(finite) if finite else float("nan")

        return {
            "batches": len(self.history),
            "optimizer_steps": sum(len(b["steps"]) for b in self.history),
            "skipped_prompts": sum(b["skipped"] for b in self.history),
            "per_step": [{k: mean(v) for k, v in per_index[i].items()} for i in sorted(per_index)],
        }

    def kernel_block(self, model) -> contextlib.AbstractContextManager:
        """The block adaptation runs in (``fla_gated_kernel``, `trl_refine.kernels.fla_gated_choice`): the swap of
        fla's GatedDeltaNet chunk op for ``trl_refine``, else nothing; resolved (and refused for a model without
        such layers) once per model, before its first step."""
        if self._kernel_decided_for != id(model):
            self._kernel = resolve_fla_gated_kernel(self.config.fla_gated_kernel, unwrap(model), model_device(model))
            self._kernel_decided_for = id(model)
        return fla_gated_kernel_block(self._kernel, unwrap(model))

    def adapt(self, model, tokenizer, prompts: Sequence[str]) -> dict[str, Any]:
        """Take ``steps`` ReFINE passes over ``prompts`` (never restores) inside `kernel_block`; returns this batch's
        stats."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        with self.kernel_block(model):
            return self._adapt(model, tokenizer, prompts)

    def _adapt(self, model, tokenizer, prompts: Sequence[str]) -> dict[str, Any]:
        cfg = self.config
        prompts = list(prompts)
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first")
        encoded = [
            truncate_middle(list(ids), cfg.max_prompt_tokens)
            for ids in tok(prompts, add_special_tokens=cfg.add_special_tokens)["input_ids"]
        ]
        min_len = cfg.min_prompt_length
        short = [i for i, ids in enumerate(encoded) if len(ids) < min_len]
        if short and cfg.short_prompts == "error":
            raise ValueError(
                f"{len(short)} prompt(s) have fewer than {min_len} tokens (e.g. #{short[0]}: {len(encoded[short[0]])}); "
                "test-time ReFINE needs margin + n·k + max(k, margin). Lower nsp_num_chunks / nsp_margin or set "
                "short_prompts='skip'."
            )
        if short:
            logger.warning("trl_refine: %d prompt(s) shorter than %d tokens are not adapted on", len(short), min_len)
        keep = [i for i in range(len(prompts)) if i not in set(short)]
        stats: dict[str, Any] = {"prompts": len(prompts), "skipped": len(short), "steps": []}
        if not keep:
            self.history.append(stats)
            return stats

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
        optimizer = self._get_optimizer(model, params)
        engine = self._get_engine(model, pad)
        device = model_device(model)
        mbs = cfg.mini_batch_size or len(keep)
        model.eval()  # deterministic forwards (no dropout); gradients still flow
        try:
            with fused_lm_head(model), self._autocast(device):
                for step in range(cfg.steps):
                    # one rollout round per unit (the batch, or each mini-batch), then one optimizer step per
                    # mini-batch of the unit
                    per_unit = len(keep) if cfg.rollouts_per == "batch" else mbs
                    for start in range(0, len(keep), per_unit):
                        unit = keep[start : start + per_unit]
                        docs = left_pad([encoded[i] for i in unit], pad, device)
                        parts = [range(s, min(s + mbs, len(unit))) for s in range(0, len(unit), mbs)]
                        if cfg.nsp_coef == 0:
                            for part in parts:
                                stats["steps"].append(self._ntp_step(model, optimizer, params, _rows(docs, part)))
                            continue
                        sampled = self._sample(model, tok, engine, docs, [prompts[i] for i in unit], device, step)
                        for part in parts:
                            stats["steps"].append(
                                self._optimize(model, engine, optimizer, params, docs, sampled, part)
                            )
        except BaseException:
            optimizer.zero_grad(set_to_none=True)  # no half-accumulated gradients left on the parameters
            raise
        self.history.append(stats)
        return stats

    # -- internals ------------------------------------------------------------------------------------------------------
    def _autocast(self, device: torch.device):
        if self.config.mixed_precision is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    def _get_optimizer(self, model, params) -> torch.optim.Optimizer:
        cfg = self.config
        if self._optimizer is None or self._optimizer_model != id(model):
            if self._precision_checked_for != id(model):
                self._precision_checked_for = id(model)
                warn_if_updates_vanish(model, cfg.learning_rate)
            self._optimizer = torch.optim.AdamW(
                params,
                lr=cfg.learning_rate,
                betas=(cfg.adam_beta1, cfg.adam_beta2),
                eps=cfg.adam_epsilon,
                weight_decay=cfg.weight_decay,
            )
            self._optimizer_model = id(model)
        return self._optimizer

    def _get_engine(self, model, pad: int) -> RolloutEngine:
        if isinstance(self._engine_arg, RolloutEngine):
            return self._engine_arg
        if self._engine is None:
            self._engine = build_engine(
                self._engine_arg or self.config.nsp_engine,
                unwrap(model),
                pad_token_id=pad,
                rows_per_call=self.config.nsp_generic_rows_per_call,
            )
        return self._engine

    def _reward_funcs(self) -> tuple[list[Callable], list[float]]:
        if self.reward_funcs is None:
            return builtin_reward_funcs(self.config.nsp_reward)
        return self.reward_funcs, self.reward_weights or [1.0] * len(self.reward_funcs)

    def _needs_hidden(self, model, funcs) -> bool:
        """`trl_refine.step.hidden_states_needed`, decided once per model."""
        if self._hidden_decided_for != id(model):
            self._hidden_decided_for = id(model)
            self._hidden = hidden_states_needed(funcs, model)
        return self._hidden

    def _ntp_step(self, model, optimizer, params, docs) -> dict[str, float]:
        """``nsp_coef = 0`` (the NTP-only "SFT" test-time baseline): no rollouts, CE on the prompts only."""
        cfg = self.config
        optimizer.zero_grad(set_to_none=True)
        total_tokens = docs.label_mask().sum().clamp(min=1)
        ntp_total = 0.0
        if cfg.ntp_count_pad_targets:  # the release's fla loss: one forward, pads counted
            nll, total_tokens = padded_ntp_terms(model, docs)
            (cfg.ntp_coef * nll / total_tokens.clamp(min=1)).backward()
            ntp_total = nll.item()
        else:
            for nll, _ in plain_ntp_terms(model, docs):
                (cfg.ntp_coef * nll / total_tokens).backward()
                ntp_total += nll.item()
        grad_norm = float("nan")
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        nan = float("nan")
        return {
            "ntp_loss": ntp_total / float(total_tokens),
            "policy_loss": nan,
            "reward": nan,
            "exact_match": nan,
            "clip_fraction": nan,
            "grad_norm": grad_norm,
        }

    def _sample(self, model, tok, engine, docs, texts, device, step) -> _Sampled:
        """One rollout round for ``docs`` (no grad): positions, rollouts, rewards and advantages."""
        cfg = self.config
        funcs, weights = self._reward_funcs()
        need_hidden = self._needs_hidden(model, funcs)
        # one prompt (no padding): its loss forward is exactly the sampling pass, run with gradients
        single_use = None if docs.batch_size == 1 else "a round of several prompts is trained prompt by prompt"
        reuse = sampling_pass_reuse_problem(cfg, engine, model, single_use=single_use) is None
        step_out = sample_rollouts(
            engine,
            model,
            docs,
            cfg,
            generators=rollout_generators(_stable_seed(cfg.seed, texts, step), device),
            masked_token_ids=masked_rollout_tokens(tok, cfg.nsp_sample_eos),
            train_model=model if reuse else None,
            need_hidden=need_hidden,
        )
        with torch.no_grad():
            rows = reward_rows(step_out, tok, tail_tokens=cfg.nsp_prompt_tail_tokens, need_hidden=need_hidden)
            rewards = score_rewards(funcs, weights, rows, step_out.positions.device)
            advantages, _ = step_advantages(rewards, cfg, scale=cfg.scale_rewards)
        return _Sampled(step_out.positions, step_out.rollout, step_out.ground_truth_ids, rewards, advantages)

    def _optimize(self, model, engine, optimizer, params, docs, sampled: _Sampled, part: range) -> dict[str, float]:
        """One optimizer step on the documents ``part`` of ``docs`` and their rollouts of ``sampled``; the backward
        runs document by document (gradients accumulate), the loss is the token mean over the mini-batch: NTP over
        all its prompt tokens, PPO-clip over all its rollout tokens."""
        cfg = self.config
        g, k = cfg.nsp_num_rollouts, cfg.nsp_rollout_length
        per_doc = cfg.nsp_num_chunks * g
        rollout = sampled.rollout
        mine = slice(part.start * per_doc, part.stop * per_doc)
        optimizer.zero_grad(set_to_none=True)
        ntp_tokens = _rows(docs, part).label_mask().sum().clamp(min=1)
        rollout_tokens = rollout.completion_ids[mine].numel()
        first = docs.first_valid
        ntp_total, pg_total, clip_total = 0.0, 0.0, 0.0
        count_pads = cfg.ntp_count_pad_targets
        if count_pads:  # the release's fla loss: the mini-batch's NTP in one forward, pads counted
            nll, ntp_tokens = padded_ntp_terms(model, _rows(docs, part))
            ntp_tokens = ntp_tokens.clamp(min=1)
            (cfg.ntp_coef * nll / ntp_tokens).backward()
            ntp_total = nll.item()
        for b in part:
            f = int(first[b])
            doc = DocumentBatch(docs.input_ids[b : b + 1, f:], docs.attention_mask[b : b + 1, f:])
            sub_plan = RolloutPlan(sampled.positions[b : b + 1] - f, g, k)
            rows = slice(b * per_doc, (b + 1) * per_doc)
            fwd = engine.forward_train(
                model, doc, sub_plan, rollout.completion_ids[rows], sampling_pass=rollout.sampling_pass
            )
            nll, _ = masked_token_nll(fwd.doc_logps, doc.label_mask())
            pg_sum, pg_stats = ppo_clip_loss(
                fwd.rollout_logps.float(),
                rollout.old_logps[rows].float(),
                sampled.advantages[rows].float(),
                epsilon_low=cfg.epsilon,
                epsilon_high=cfg.epsilon_high,
                dual_clip=cfg.dual_clip,
                reduction="sum",
            )
            loss = cfg.nsp_coef * pg_sum / rollout_tokens
            if not count_pads:
                loss = loss + cfg.ntp_coef * nll / ntp_tokens
                ntp_total += nll.item()
            loss.backward()
            pg_total += pg_sum.item()
            clip_total += pg_stats["clip_fraction"].item() * pg_stats["num_tokens"].item()
        grad_norm = float("nan")
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {
            "ntp_loss": ntp_total / float(ntp_tokens),
            "policy_loss": pg_total / rollout_tokens,
            "reward": torch.nanmean(sampled.rewards[mine]).item(),
            "exact_match": (rollout.completion_ids[mine] == sampled.truth_ids[mine]).float().mean().item(),
            "clip_fraction": clip_total / rollout_tokens,
            "grad_norm": grad_norm,
        }


@dataclass
class _Sampled:
    """One rollout round of test-time ReFINE (no grad)."""

    positions: torch.LongTensor
    rollout: Any
    truth_ids: torch.LongTensor
    rewards: torch.Tensor
    advantages: torch.Tensor


def _rows(docs: DocumentBatch, part: range) -> DocumentBatch:
    """The documents ``part`` of a left-padded batch, padded only to the longest of them."""
    rows = slice(part.start, part.stop)
    first = int(docs.first_valid[rows].min())
    return DocumentBatch(docs.input_ids[rows, first:], docs.attention_mask[rows, first:])


@contextlib.contextmanager
def test_time_adaptation(model, tokenizer, prompts: Sequence[str], config: Any = None, **overrides):
    """One-shot context manager: adapt ``model`` on ``prompts`` on entry, restore it on exit (``reset="batch"``)."""
    with TestTimeRefine(config, **overrides)(model, tokenizer, prompts) as stats:
        yield stats


def test_time_refine(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    steps: int | None = None,
    config: Any = None,
    restore: bool | None = None,
    max_new_tokens: int | Sequence[int] = 32,
    batch_size: int = 1,
    reward_funcs: Sequence[Callable] | None = None,
    show_progress: bool = False,
    return_adapter: bool = False,
    decoding: str = "greedy",
    **overrides,
):
    """Answer ``prompts`` greedily with test-time ReFINE: for each batch of ``batch_size`` prompts (in order), take
    ``steps`` ReFINE steps on the prompts themselves, decode the answers (≤ ``max_new_tokens``), then restore the
    weights bit-exactly (``restore=True``, the default via ``config.reset="batch"``) or keep adapting
    (``restore=False`` = ``reset="never"``, the official behaviour).

    ``config`` is a `TestTimeConfig` (or dict / `NSPGRPOConfig`); ``overrides`` set its fields; with
    ``mixed_precision`` set, decoding runs under the same autocast as the adaptation. ``decoding="release"``
    samples the answers as the release's evaluation does (temperature 1, top-k 50) instead of greedy decoding. Returns the answers
    (new text only, special tokens removed), or ``(answers, adapter)`` with ``return_adapter=True`` (the
    `TestTimeRefine` whose ``history`` holds per-batch stats).
    """
    from trl_refine.eval.evaluator import generate_answers

    if restore is not None:
        overrides["reset"] = "batch" if restore else "never"
    if steps is not None:
        overrides["steps"] = steps
    adapter = TestTimeRefine(config, reward_funcs=reward_funcs, **overrides)
    with adapter._autocast(model_device(model)):  # decode in the adaptation's precision too (fla rejects fp32)
        answers = generate_answers(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            adapt=adapter,
            add_special_tokens=adapter.config.add_special_tokens,
            max_prompt_tokens=adapter.config.max_prompt_tokens,
            sort_by_length=False,
            show_progress=show_progress,
            decoding=decoding,
            seed=adapter.config.seed,
            desc="test-time ReFINE",
        )
    return (answers, adapter) if return_adapter else answers


# the public names start with "test": keep pytest from collecting them where users import them into test modules
test_time_adaptation.__test__ = False
test_time_refine.__test__ = False

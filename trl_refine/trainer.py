"""`NSPGRPOTrainer`: ReFINE as a TRL `GRPOTrainer` subclass.

Glue only. A generation batch is a list of dataloader rows where every document appears ``n·G`` times in a row
(``num_generations = n·G``, see `NSPGRPOConfig`). For each document we scan it, select n positions, let the rollout
engine sample G continuations per position, score them with TRL's reward machinery, and compute GRPO advantages
per group. The loss is ``ntp_coef · CE(document) + nsp_coef · PPO-clip`` where the PPO-clip part is TRL's own
``_compute_loss`` (all loss types, clipping and metrics), fed with the engine's differentiable rollout log-probs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset, IterableDataset

import trl_refine.models  # noqa: F401  (registers the reference models with the Auto classes)
from trl_refine._compat import GRPOTrainer, check_trainer_attributes, unwrap_model_for_generation
from trl_refine.checkpoints import (
    RefineSettingsCallback,
    check_resume_settings,
    refine_settings,
    resolve_resume_checkpoint,
)
from trl_refine.config import NSPGRPOConfig
from trl_refine.data import check_documents_per_epoch, check_tokenizer, tokenize_documents, vocab_size_of
from trl_refine.guards import DivergenceGuard
from trl_refine.kernels.fla_gated_choice import fla_gated_kernel_block, resolve_fla_gated_kernel
from trl_refine.losses import masked_token_nll
from trl_refine.model_card import build_model_card
from trl_refine.model_loading import load_causal_lm
from trl_refine.modeling_utils import unwrap
from trl_refine.precision import warn_if_updates_vanish
from trl_refine.reward_checks import AllNoneRewardWarning, checked_reward_func
from trl_refine.rewards import builtin_reward_funcs, has_custom_rewards, resolve_reward_funcs
from trl_refine.rollout.base import DocumentBatch, RolloutEngine, RolloutPlan
from trl_refine.rollout.registry import build_engine
from trl_refine.rollout.sampling import masked_rollout_tokens
from trl_refine.step import (
    REWARD_ROW_KEYS,
    combine_rewards,
    hidden_states_needed,
    hidden_states_problem,
    padded_ntp_terms,
    plain_ntp_terms,
    reward_rows,
    rollout_generators,
    sample_rollouts,
    sampling_pass_reuse_problem,
    step_advantages,
)
from trl_refine.utils import left_pad

logger = logging.getLogger("trl_refine")

DOC_KEYS = ("doc_input_ids", "doc_attention_mask", "positions")
ROLLOUT_KEYS = ("completion_ids", "completion_mask", "old_per_token_logps", "advantages")
#: batch key of the engine's sampling pass kept for the loss (`nsp_reuse_sampling_pass`)
SAMPLING_PASS_KEY = "nsp_sampling_pass"
#: per-generation statistics of the rollouts (NaN in an NTP-only run, `nsp_coef` = 0)
NSP_STAT_KEYS = ("nsp/exact_match", "nsp/entropy_selected", "nsp/entropy_document")


class NSPGRPOTrainer(GRPOTrainer):
    """GRPO on next-sequence prediction (ReFINE) for fast-weight and other causal LMs.

    Takes GRPOTrainer's arguments. ``reward_funcs`` is optional: by default the config's built-in reward
    (``nsp_reward``) is used. ``engine`` overrides ``args.nsp_engine`` with an engine name or instance.
    """

    _tag_names = ["trl", "grpo", "nsp-grpo", "refine"]
    _name = "NSP-GRPO"
    _paper = {
        "title": "Reinforced Fast Weights with Next-Sequence Prediction",
        "id": "2602.16704",
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: NSPGRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        engine: RolloutEngine | str | None = None,
        **kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = NSPGRPOConfig(output_dir=f"{str(name).split('/')[-1]}-NSP-GRPO")
        if not isinstance(args, NSPGRPOConfig):
            raise TypeError(f"args must be an NSPGRPOConfig, got {type(args).__name__}.")
        for unsupported in ("rollout_func", "tools", "environment_factory"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(
                    f"{unsupported} is not supported by NSPGRPOTrainer: ReFINE generates its own rollouts."
                )
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if train_dataset is None:
            raise ValueError(
                f"train_dataset is required: a dataset of long documents in column {args.document_column!r}."
            )
        if processing_class is not None:
            check_tokenizer(getattr(processing_class, "tokenizer", processing_class))
        reward_funcs = resolve_reward_funcs(reward_funcs)
        if reward_funcs is None:
            reward_funcs, weights = builtin_reward_funcs(args.nsp_reward)
            if args.reward_weights is None:
                args.reward_weights = weights
        init_kwargs = args.model_init_kwargs
        if isinstance(model, str):  # TRL's create_model_from_path cannot resolve Auto-registered model types
            model = load_causal_lm(model, {"trust_remote_code": args.trust_remote_code, **(init_kwargs or {})})
            args.model_init_kwargs = None  # used; TRL would warn that they are ignored for an instance
        try:
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
            )
        finally:
            args.model_init_kwargs = init_kwargs
        check_trainer_attributes(self)
        #: the kernel fla's GatedDeltaNet layers run in train / evaluate / predict ('fla' or 'trl_refine', from
        #: `fla_gated_kernel`), decided here so that 'trl_refine' on a model without such layers fails at construction
        self.fla_gated_kernel = resolve_fla_gated_kernel(
            args.fla_gated_kernel, unwrap(self.model), self.accelerator.device
        )
        warn_if_updates_vanish(self.model, args.learning_rate)
        self.tokenizer_ = getattr(self.processing_class, "tokenizer", self.processing_class)
        check_tokenizer(self.tokenizer_)
        prep = {
            "tokenizer": self.tokenizer_,
            "column": args.document_column,
            "max_length": args.nsp_max_length,
            "min_length": args.min_document_length,
            "short_documents": args.nsp_short_documents,
            "vocab_size": vocab_size_of(self.model),
            "keep_min_length": args.nsp_min_length,
            "add_special_tokens": args.nsp_add_special_tokens,
        }
        self.train_dataset = tokenize_documents(self.train_dataset, name="train_dataset", **prep)
        check_documents_per_epoch(
            self.train_dataset,
            args.generation_batch_size // self.num_generations,
            f"documents_per_device={args.documents_per_device} × {self.accelerator.num_processes} process(es) × "
            f"steps_per_generation={args.steps_per_generation}",
        )
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                key: tokenize_documents(ds, name=f"eval_dataset[{key!r}]", **prep)
                for key, ds in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = tokenize_documents(self.eval_dataset, name="eval_dataset", **prep)

        # custom rewards: output checked (one float or None per rollout), errors name the function
        self.reward_funcs = [checked_reward_func(f) if has_custom_rewards([f]) else f for f in self.reward_funcs]
        self._all_none_rewards = AllNoneRewardWarning()
        # hidden states for the rewards: required by the cosine / hybrid rewards (and callables marked
        # `needs_hidden_states`), given to other custom rewards when the model provides them, skipped otherwise
        self._needs_hidden = hidden_states_needed(self.reward_funcs, self.model, self.accelerator.device)
        if has_custom_rewards(self.reward_funcs) and not self._needs_hidden:
            logger.info(
                "custom rewards get rollout_hidden_states=None: %s",
                hidden_states_problem(self.model, self.accelerator.device),
            )
        if isinstance(engine, RolloutEngine):
            self.engine = engine
        else:
            self.engine = build_engine(
                engine or args.nsp_engine,
                unwrap(self.model),
                pad_token_id=self.tokenizer_.pad_token_id,
                rows_per_call=args.nsp_generic_rows_per_call,
                checkpoint_segments=args.nsp_segment_checkpointing,
            )
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        # `activation_checkpointing` is the transformers >= 5.19 name; older versions only have `gradient_checkpointing`
        checkpointing = args.gradient_checkpointing or getattr(args, "activation_checkpointing", False)
        if args.nsp_coef > 0:  # nsp_coef = 0: the engine never runs (NTP only)
            problem = engine_training_problem(
                self.engine,
                zero_stage=deepspeed.zero_stage if deepspeed is not None else None,
                activation_checkpointing=bool(checkpointing),
            )
            if problem is not None:
                raise ValueError(problem)
        if args.nsp_on_divergence == "skip" and deepspeed is not None:
            raise ValueError(
                "nsp_on_divergence='skip' drops a step's gradients before the optimizer step, which DeepSpeed's "
                "engine does not allow. Use nsp_on_divergence='stop' (the default) with DeepSpeed."
            )
        #: stops or skips non-finite steps before they reach the weights or a checkpoint (trl_refine.guards)
        self.divergence_guard = DivergenceGuard(args.nsp_on_divergence, self.accelerator)
        self.add_callback(self.divergence_guard)
        self.add_callback(RefineSettingsCallback(refine_settings(self)))
        #: tokens the rollouts never sample (EOS unless nsp_sample_eos, as the release's min_new_tokens = k)
        self.masked_rollout_tokens = masked_rollout_tokens(self.tokenizer_, args.nsp_sample_eos)
        self._nsp_precomputed: tuple[torch.Tensor, torch.Tensor | None] | None = None
        #: whether training generations let the loss reuse the engine's sampling pass (None: not yet decided)
        self.reused_sampling_pass: bool | None = None
        self._reuse_decided_for: torch.nn.Module | None = None  # the wrapped model the decision was made for
        self._warned_unused_pass = False

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """Write README.md in ``output_dir``: the base model, a quick start that loads our model types, ReFINE's
        citation (TRL's card names no base model for local checkpoints and its quick start needs the import)."""
        if not self.is_world_process_zero():
            return
        tags = {tags} if isinstance(tags, str) else set(tags or ())
        card = build_model_card(
            unwrap(self.model),
            model_name=model_name or os.path.basename(os.path.normpath(self.args.output_dir)),
            hub_model_id=self.hub_model_id,
            output_dir=self.args.output_dir,
            trainer_name=self._name,
            dataset_name=dataset_name,
            tags=sorted(tags | set(self._tag_names)),
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    # ------------------------------------------------------------------------------------------------------------------
    # batching
    def _prepare_inputs(self, generation_batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Generate once per generation batch and hand out whole-document micro-batches (TRL's cadence)."""
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        spg = self.args.steps_per_generation
        generate_every = spg * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = split_by_documents(batch, spg)
        return self._buffered_inputs[self._step % spg]

    def _collate_documents(self, rows: list[dict[str, Any]]) -> DocumentBatch:
        pad = self.tokenizer_.pad_token_id
        seqs = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
        too_short = [len(s) for s in seqs if len(s) < self.args.min_document_length]
        if too_short:
            raise ValueError(
                f"a document with {too_short[0]} tokens reached the trainer; ReFINE needs at least "
                f"{self.args.min_document_length}. Filter the (streaming) dataset or lower n / k / margin."
            )
        return left_pad(seqs, pad, self.accelerator.device)

    def _reuses_sampling_pass(self) -> bool:
        """Whether this generation runs the engine's document pass with gradients for the loss to reuse
        (`nsp_reuse_sampling_pass`). Exact only when nothing updates the weights between sampling and the loss, i.e.
        one generation batch serves one micro-step once; logged once with the reason when it does not apply."""
        args = self.args
        if not (args.nsp_reuse_sampling_pass and self.model.training and self.engine.reuses_sampling_pass):
            return False
        if self._reuse_decided_for is self.model_wrapped:  # config and wrapping only: decided once
            return bool(self.reused_sampling_pass)
        self._reuse_decided_for = self.model_wrapped
        single_use = None
        if args.steps_per_generation * self.num_iterations != 1:
            single_use = (
                f"one generation batch serves steps_per_generation·num_iterations = "
                f"{args.steps_per_generation}·{self.num_iterations} micro-steps (set steps_per_generation=1 and "
                "num_iterations=1 to reuse it)"
            )
        why = sampling_pass_reuse_problem(args, self.engine, self.model_wrapped, single_use=single_use)
        if why is None:
            logger.info(
                "the %s engine's sampling pass also serves the loss (nsp_reuse_sampling_pass); scan: %s",
                self.engine.name,
                self._scan_mode(),
            )
        else:
            logger.info("nsp_reuse_sampling_pass does not apply: %s; the loss runs its own pass", why)
        self.reused_sampling_pass = why is None
        return why is None

    def _scan_mode(self) -> str:
        """How the entropy scan runs when the sampling pass is reused, for the one-time log line: fused into the
        loss's document forward (`nsp_fuse_scan`, `sample_rollouts`) or a pass of its own, and why."""
        if not self.args.nsp_fuse_scan:
            return "a no-grad pass of its own (nsp_fuse_scan=False)"
        problem = self.engine.fused_scan_problem(self.model_wrapped)
        if problem:
            return f"a no-grad pass of its own ({problem})"
        return "from the loss's document forward (nsp_fuse_scan: one document forward per step)"

    def _rollout_seed(self, mode: str) -> int:
        """A function of (seed, optimizer step, micro-step, rank, mode) only, so a resumed run samples what an
        uninterrupted one would; the micro-step counts generations within one optimizer step (steps_per_generation <
        gradient_accumulation_steps), which would otherwise draw the same numbers."""
        seed = (self.args.seed * 1_000_003 + self.state.global_step) * 4096
        micro = self._step % self.args.gradient_accumulation_steps if mode == "train" else 0
        seed += self.accelerator.process_index * 4 + (mode == "eval") * 2
        if micro:  # mixed into the low 32 bits too: the CPU generator (mt19937) only reads those
            seed ^= (micro * 0x9E3779B97F4A7C15) % 2**64
        return seed % 2**63

    def _rollout_generator(self, mode: str, stream: int) -> torch.Generator:
        """Stream 0 selects positions, stream 1 samples rollouts (`trl_refine.step.rollout_generators`)."""
        return rollout_generators(self._rollout_seed(mode), self.accelerator.device)[stream]

    # ------------------------------------------------------------------------------------------------------------------
    # steps 1-5
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        args = self.args
        mode = "train" if self.model.training else "eval"
        per_doc = args.nsp_num_chunks * args.nsp_num_rollouts
        if len(inputs) % per_doc != 0:
            raise RuntimeError(f"got {len(inputs)} rows, not a multiple of n·G = {per_doc}")
        doc_rows = inputs[::per_doc]
        docs = self._collate_documents(doc_rows)
        if args.nsp_coef == 0:
            return self._ntp_only_inputs(docs, mode)

        with (
            torch.no_grad(),
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation
            ) as unwrapped,
            self.accelerator.autocast(),
        ):
            step = sample_rollouts(
                self.engine,
                unwrapped,
                docs,
                args,
                generators=(self._rollout_generator(mode, 0), self._rollout_generator(mode, 1)),
                masked_token_ids=self.masked_rollout_tokens,
                train_model=self.model_wrapped if self._reuses_sampling_pass() else None,
                need_hidden=self._needs_hidden,
            )
        scan, positions, plan, rollout = step.scan, step.positions, step.plan, step.rollout
        truth_ids = step.ground_truth_ids
        completion_ids = rollout.completion_ids
        rows = reward_rows(
            step, self.tokenizer_, tail_tokens=args.nsp_prompt_tail_tokens, need_hidden=self._needs_hidden
        )
        prompts, completions, truth_text = rows["prompts"], rows["completions"], rows["ground_truth_text"]
        reward_inputs = []
        for r in range(plan.num_rows):
            row = {key: value for key, value in doc_rows[r // per_doc].items() if key != "input_ids"}
            row.update({key: rows[key][r] for key in REWARD_ROW_KEYS})
            reward_inputs.append(row)
        rewards_per_func = self._calculate_rewards(reward_inputs, prompts, completions, rows["completion_ids"])

        # step 5: advantages over groups (document or prefix) of the gathered rewards
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        self._all_none_rewards.observe(unscorable, self.reward_func_names)
        rewards = combine_rewards(rewards_per_func, self.reward_weights.to(rewards_per_func.device))
        advantages, group_std = step_advantages(rewards, args, scale=self.scale_rewards)
        local = slice(
            self.accelerator.process_index * plan.num_rows, (self.accelerator.process_index + 1) * plan.num_rows
        )

        # metrics
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(_nanstd(rewards_per_func[:, i]))
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(_nanstd(rewards))
        metrics["frac_reward_zero_std"].append(
            torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item()
        )
        exact = (completion_ids == truth_ids).float()
        valid = docs.label_mask()
        sel_entropy = scan.entropy.gather(1, positions)
        local_stats = torch.stack(
            [
                exact.sum(),
                torch.tensor(float(exact.numel()), device=exact.device),
                sel_entropy.sum().float(),
                torch.tensor(float(sel_entropy.numel()), device=exact.device),
                (scan.entropy * valid).sum().float(),
                valid.sum().float(),
                docs.attention_mask.sum().float(),
            ]
        )
        totals = self.accelerator.reduce(local_stats, reduction="sum")
        metrics["nsp/exact_match"].append((totals[0] / totals[1]).item())
        metrics["nsp/entropy_selected"].append((totals[2] / totals[3]).item())
        metrics["nsp/entropy_document"].append((totals[4] / totals[5].clamp(min=1)).item())
        if mode == "train":
            self.divergence_guard.observe(self.state, "the entropy of the model's predictions", totals[2] + totals[4])
            self.state.num_input_tokens_seen += int(totals[6].item()) + int(totals[1].item())
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]

        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend(advantages.tolist())
        self._logs["extra"]["ground_truth"].extend(gather_object(truth_text))

        completion_mask = torch.ones_like(completion_ids)
        num_items = gather(completion_mask.sum()).sum()
        batch = {} if rollout.sampling_pass is None else {SAMPLING_PASS_KEY: rollout.sampling_pass}
        return batch | {
            "doc_input_ids": docs.input_ids,
            "doc_attention_mask": docs.attention_mask,
            "positions": positions,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "old_per_token_logps": rollout.old_logps,
            "advantages": advantages[local].to(completion_ids.device),
            "num_items_in_batch": num_items,
        }

    def _ntp_only_inputs(self, docs: DocumentBatch, mode: str) -> dict[str, Any]:
        """``nsp_coef = 0`` (an NTP-only run): no scan, selection, rollouts or rewards. The ReFINE metrics are logged
        as NaN (the logger drops them) so that both kinds of run have the same keys; every process makes the same
        collective calls (one reduce here, the empty policy term in `compute_loss`)."""
        args = self.args
        metrics = self._metrics[mode]
        nan = float("nan")
        for name in self.reward_func_names:
            metrics[f"rewards/{name}/mean"].append(nan)
            metrics[f"rewards/{name}/std"].append(nan)
        for key in ("reward", "reward_std", "frac_reward_zero_std") + NSP_STAT_KEYS:
            metrics[key].append(nan)
        tokens = self.accelerator.reduce(docs.attention_mask.sum().float(), reduction="sum")
        if mode == "train":
            self.state.num_input_tokens_seen += int(tokens.item())
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        no_rows = docs.input_ids.new_zeros((0, args.nsp_rollout_length))
        return {
            "doc_input_ids": docs.input_ids,
            "doc_attention_mask": docs.attention_mask,
            "positions": docs.input_ids.new_zeros((docs.batch_size, 0)),
            "completion_ids": no_rows,
            "completion_mask": no_rows,
            "old_per_token_logps": no_rows.float(),
            "advantages": no_rows.new_zeros(0, dtype=torch.float),
            "num_items_in_batch": no_rows.new_zeros(()),
        }

    # ------------------------------------------------------------------------------------------------------------------
    # step 6
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``ntp_coef · NTP / GA + nsp_coef · PPO-clip``; ``nsp_coef = 0``: the NTP term alone (`_ntp_only_loss`)."""
        if return_outputs:
            raise ValueError("NSPGRPOTrainer does not return outputs")
        if self.args.nsp_coef == 0:
            return self._ntp_only_loss(model, inputs)
        args = self.args
        mode = "train" if self.model.training else "eval"
        docs = DocumentBatch(inputs["doc_input_ids"], inputs["doc_attention_mask"])
        plan = RolloutPlan(inputs["positions"], args.nsp_num_rollouts, args.nsp_rollout_length)
        # popped: the pass (and its graph) must not outlive this micro-step in the buffered inputs; a copy of a batch
        # whose pass was used, or a call with another model, runs its own pass
        sampling_pass = inputs.pop(SAMPLING_PASS_KEY, None)
        if sampling_pass is not None and not sampling_pass.usable_by(model):
            if not sampling_pass.used and not self._warned_unused_pass:
                self._warned_unused_pass = True
                logger.warning(
                    "the sampling pass kept for the loss could not be used (the loss got another model object than "
                    "the one that sampled, or the weights changed in between): the loss runs its own pass, and the "
                    "sampling pass was built for nothing. Set nsp_reuse_sampling_pass=False."
                )
            sampling_pass = None
        with self.accelerator.autocast():
            fwd = self.engine.forward_train(model, docs, plan, inputs["completion_ids"], sampling_pass=sampling_pass)
        if args.ntp_count_pad_targets:
            ntp_loss = self._padded_ntp_loss(model, docs)
        else:
            nll, count = masked_token_nll(fwd.doc_logps, docs.label_mask())
            ntp_loss = nll / count.clamp(min=1)
        entropy = fwd.rollout_entropy if fwd.rollout_entropy is not None else torch.zeros_like(fwd.rollout_logps)
        policy_loss = self._policy_loss(model, inputs, fwd.rollout_logps, entropy)
        scale = self._loss_scale()
        loss = args.ntp_coef * ntp_loss / scale
        loss = loss + args.nsp_coef * policy_loss
        self._log_losses(mode, ntp_loss, policy_loss.detach() * scale)
        return loss

    def _ntp_only_loss(self, model, inputs) -> torch.Tensor:
        """``nsp_coef = 0`` (an NTP-only run): ``ntp_coef`` · the NTP loss of one plain forward per document
        (`plain_ntp_terms`, or the padded batch under ``ntp_count_pad_targets``), no engine. TRL's policy loss still
        runs on the zero rollout rows, so that its metrics get the keys of a ReFINE run; they and the policy loss are
        logged as missing (NaN), as zero rollouts have no policy term."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        docs = DocumentBatch(inputs["doc_input_ids"], inputs["doc_attention_mask"])
        if args.ntp_count_pad_targets:
            ntp_loss = self._padded_ntp_loss(model, docs)
        else:
            with self.accelerator.autocast():
                terms = list(plain_ntp_terms(model, docs))
            nll, count = (torch.stack(t).sum() for t in zip(*terms))
            ntp_loss = nll / count.clamp(min=1)
        logged = {key: len(values) for key, values in self._metrics[mode].items()}
        no_rows = inputs["old_per_token_logps"]
        self._policy_loss(model, inputs, no_rows, torch.zeros_like(no_rows))
        for key, values in self._metrics[mode].items():  # TRL's policy metrics of zero rollouts read 0
            values[logged.get(key, 0) :] = [float("nan")] * (len(values) - logged.get(key, 0))
        self._log_losses(mode, ntp_loss, None)
        return args.ntp_coef * ntp_loss / self._loss_scale()

    def _padded_ntp_loss(self, model, docs: DocumentBatch) -> torch.Tensor:
        """``ntp_count_pad_targets``: the release's fla loss, pads counted as inputs and targets, from one forward of
        the padded batch (one more when the engine has already run)."""
        with self.accelerator.autocast():
            nll, count = padded_ntp_terms(model, docs)
        return nll / count.clamp(min=1)

    def _loss_scale(self) -> float:
        """What a micro-step's loss is divided by: the gradient accumulation steps in training, 1 in evaluation."""
        return self.current_gradient_accumulation_steps if self.model.training else 1.0

    def _policy_loss(self, model, inputs, rollout_logps: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """TRL's GRPO loss (`GRPOTrainer._compute_loss`) of the rollout rows, given the engine's log-probs."""
        self._nsp_precomputed = (rollout_logps, entropy)
        rollout_inputs = {
            "prompt_ids": inputs["completion_ids"][:, :0],
            "prompt_mask": inputs["completion_mask"][:, :0],
            "completion_ids": inputs["completion_ids"],
            "completion_mask": inputs["completion_mask"],
            "advantages": inputs["advantages"],
            "old_per_token_logps": inputs["old_per_token_logps"],
            "num_items_in_batch": inputs["num_items_in_batch"],
        }
        try:
            return self._compute_loss(model, rollout_inputs)
        finally:
            self._nsp_precomputed = None

    def _log_losses(self, mode: str, ntp_loss: torch.Tensor, policy_loss: torch.Tensor | None) -> None:
        """Log the NTP loss and the (unscaled) policy loss (``None``: no policy term, logged as NaN), both averaged
        over the processes, and have the divergence guard check them in training."""
        metrics = self._metrics[mode]
        ntp_mean = self.accelerator.gather(ntp_loss.detach()).mean().item()
        policy_mean = None if policy_loss is None else self.accelerator.gather(policy_loss).mean().item()
        if mode == "train":
            self.divergence_guard.observe(self.state, "the NTP loss", ntp_mean)
            if policy_mean is not None:
                self.divergence_guard.observe(self.state, "the policy (PPO-clip) loss", policy_mean)
        metrics["ntp_loss"].append(ntp_mean)
        metrics["nsp/policy_loss"].append(float("nan") if policy_mean is None else policy_mean)

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm (all-reduced, before clipping), checked by the divergence guard."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.divergence_guard.observe(self.state, "the gradient norm", grad_norm)
        return grad_norm

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, with ``resume_from_checkpoint`` = ``True`` / ``"last"`` resuming from the newest complete
        checkpoint of ``output_dir`` (incomplete ones, from a run killed during a save, are skipped), and a resume
        with changed ReFINE settings refused or warned about (`trl_refine.checkpoints`)."""
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            check_resume_settings(checkpoint, refine_settings(self))
        with self.kernel_block():
            return super().train(checkpoint, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """`Trainer.evaluate` inside `kernel_block` (a call outside `train`; within it the block is already held)."""
        with self.kernel_block():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        """`Trainer.predict` inside `kernel_block`."""
        with self.kernel_block():
            return super().predict(*args, **kwargs)

    def kernel_block(self) -> contextlib.AbstractContextManager:
        """The block `train`, `evaluate` and `predict` run in: with ``fla_gated_kernel`` resolved to ``trl_refine``,
        the swap of fla's GatedDeltaNet chunk op (`use_trl_refine_gated_kernel`), else nothing.

        Held around the whole of `Trainer.train` rather than `training_step` or `compute_loss`, because the swap must
        cover every forward that can reach fla's op and every backward: the rollouts (`_prepare_inputs`, run inside
        the step), the loss forward, the backward together with any forward it recomputes (activation
        checkpointing, ``nsp_segment_checkpointing``: the op is looked up again then), `NSPPostTrainer`'s nested
        step (its answer forward and backward run after the stock step returns), and the evaluations the loop runs.
        The swap is process-wide and nestable, so the `evaluate` inside `train` simply nests."""
        return fla_gated_kernel_block(self.fla_gated_kernel, unwrap(self.model))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        """Inside `compute_loss`, hand TRL's loss the engine's log-probs instead of recomputing them."""
        if self._nsp_precomputed is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *a, **kw
            )
        logps, entropy = self._nsp_precomputed
        if logps.size(1) != logits_to_keep:
            raise RuntimeError(
                f"engine returned {logps.size(1)} rollout log-probs per row, TRL expects {logits_to_keep}"
            )
        return logps, entropy, None


def _nanstd(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return x.std().item() if x.numel() > 1 else 0.0


def split_by_documents(batch: dict[str, Any], num_splits: int) -> list[dict[str, Any]]:
    """Split a generation batch into ``num_splits`` micro-batches of whole documents and their rollouts."""
    if num_splits == 1:
        return [batch]
    docs = batch["doc_input_ids"].size(0)
    rows = batch["completion_ids"].size(0)
    if docs % num_splits != 0:
        raise RuntimeError(f"{docs} documents do not split into {num_splits} micro-batches")
    d, r = docs // num_splits, rows // num_splits
    out = []
    for i in range(num_splits):
        part = {key: batch[key][i * d : (i + 1) * d] for key in DOC_KEYS}
        part.update({key: batch[key][i * r : (i + 1) * r] for key in ROLLOUT_KEYS})
        part["num_items_in_batch"] = batch["num_items_in_batch"]
        out.append(part)
    return out


def check_model_hidden_states(model: torch.nn.Module, device: torch.device | None = None) -> None:
    """Fail early if the model cannot expose last-layer hidden states (needed by the cosine / hybrid rewards)."""
    problem = hidden_states_problem(model, device)
    if problem is not None:
        raise ValueError(f"{problem}. Use nsp_reward='exact' or pass reward_funcs that do not read hidden states.")


def engine_training_problem(
    engine: RolloutEngine, *, zero_stage: int | None, activation_checkpointing: bool
) -> str | None:
    """Why ``engine`` cannot train under this setup, from the abilities it declares (`RolloutEngine`), or None."""
    if zero_stage == 3 and engine.applies_lm_head_outside_forward:
        return (
            f"the {engine.name} engine applies the LM head to hidden states outside the model call, where DeepSpeed "
            "ZeRO-3 has released the partitioned head weight. With ZeRO-3 set nsp_engine='generic'; or keep the "
            f"{engine.name} engine with ZeRO-2 or FSDP2 (docs/distributed.md)."
        )
    if activation_checkpointing and engine.needs_recurrent_cache_in_training:
        return (
            "activation (gradient) checkpointing makes HF models drop their recurrent cache in training, which breaks "
            f"the {engine.name} engine. Set activation_checkpointing=False or nsp_engine='generic'."
        )
    return None

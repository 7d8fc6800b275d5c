"""`NSPGRPOConfig`: every ReFINE knob, with defaults that reproduce the official release.

TRL counts GRPO batches in completions and groups them by ``num_generations``. We keep all ``n·G`` rollouts of a
document on one process by setting ``num_generations = n·G`` (one dataloader row per rollout, every document
repeated ``n·G`` times contiguously), so ``per_device_train_batch_size`` is ``documents_per_device · n · G``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from trl_refine.grpo_options import check_grpo_options
from trl_refine.kernels.fla_gated_choice import check_fla_gated_kernel

SELECTION_STRATEGIES = ("entropy", "uniform", "argmax", "argmin")
REWARDS = ("cosine", "exact", "hybrid")
GROUPINGS = ("auto", "document", "prefix")
ENGINES = ("auto", "generic", "snapshot", "onepass")
SHORT_DOCUMENT_POLICIES = ("error", "drop")
DIVERGENCE_POLICIES = ("stop", "skip")
#: TRL's GRPO loss types (`GRPOTrainer._compute_loss`) and advantage scalings
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")

#: fields checked for their type at construction (a wrong type would otherwise fail deep inside the trainer)
INT_FIELDS = ("nsp_num_chunks", "nsp_rollout_length", "nsp_num_rollouts", "nsp_margin", "nsp_prompt_tail_tokens")
OPTIONAL_INT_FIELDS = (
    "nsp_smoothing_width",
    "nsp_max_length",
    "documents_per_device",
    "nsp_generic_rows_per_call",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
)
FINITE_FLOAT_FIELDS = (
    "ntp_coef",
    "nsp_coef",
    "nsp_selection_temperature",
    "learning_rate",
    "weight_decay",
    "epsilon",
    "max_grad_norm",
)
OPTIONAL_FINITE_FLOAT_FIELDS = ("delta", "epsilon_high")


def default_smoothing_width(rollout_length: int) -> int:
    """The official moving-average width: k if k is odd, else k + 1 (so the window is centred)."""
    return rollout_length if rollout_length % 2 == 1 else rollout_length + 1


def resolve_group_by(group_by: str, num_rollouts: int) -> str:
    """``auto`` (default) is the release's rule: one group per prefix when G > 1, one per document when G = 1."""
    if group_by == "auto":
        return "prefix" if num_rollouts > 1 else "document"
    return group_by


def min_document_length(num_chunks: int, rollout_length: int, margin: int) -> int:
    """Fewest valid tokens a document needs: ``margin`` before the first continuation, n disjoint windows of k
    tokens, and ``max(k, margin)`` tokens after the last position (the official clamp keeps ``margin`` at both
    ends)."""
    return margin + num_chunks * rollout_length + max(rollout_length, margin)


def check_field_types(config) -> None:
    """Integers where integers are expected and finite numbers for every coefficient, rate and temperature."""
    for name in INT_FIELDS + OPTIONAL_INT_FIELDS:
        value = getattr(config, name, None)
        if value is None and name in OPTIONAL_INT_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    for name in FINITE_FLOAT_FIELDS + OPTIONAL_FINITE_FLOAT_FIELDS:
        value = getattr(config, name, None)
        if value is None and name in OPTIONAL_FINITE_FLOAT_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
        if not math.isfinite(value):
            raise ValueError(f"{name}={value} is not a finite number; set a finite value.")


def check_batch_ranges(config) -> None:
    """Sizes that must be positive, and a centred (odd) smoothing window."""
    for name in (
        "documents_per_device",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "nsp_generic_rows_per_call",
    ):
        value = getattr(config, name, None)
        if value is not None and value < 1:
            fix = {
                "documents_per_device": "use 1 or more",
                "nsp_generic_rows_per_call": "leave it unset (all rows in one call) or use 1 or more",
            }.get(name, "leave it unset (set documents_per_device)")
            raise ValueError(f"{name} must be >= 1, got {value}; {fix}.")
    width = config.nsp_smoothing_width
    if width is not None and width % 2 == 0:
        raise ValueError(
            f"nsp_smoothing_width={width} is even: the moving average is centred on each position, so its width must "
            f"be odd. Use {width + 1}, 1 (no smoothing), or None (the official k or k+1)."
        )


def check_grpo_choices(config) -> None:
    """TRL fields whose wrong values would only fail at the first loss computation (or silently)."""
    if config.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={config.loss_type!r} is not one of {', '.join(LOSS_TYPES)} (official: 'bnpo').")
    if config.scale_rewards not in SCALE_REWARDS:
        raise ValueError(
            f"scale_rewards={config.scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)} (or True / False)."
        )
    if isinstance(config.num_iterations, bool) or not isinstance(config.num_iterations, int):
        raise TypeError(f"num_iterations must be an integer, got {config.num_iterations!r}.")
    if config.num_iterations < 1:
        raise ValueError(
            f"num_iterations must be >= 1 (1 = one update per generation batch), got {config.num_iterations}."
        )


@dataclass
class RefineFields:
    """The knobs of one ReFINE step (selection, rollouts, rewards, advantages, loss weights, engine), shared by
    `NSPGRPOConfig` (mid- and post-training) and `trl_refine.testtime.TestTimeConfig`, with one validator."""

    # ---- the ReFINE step ---------------------------------------------------------------------------------------------------
    nsp_num_chunks: int = field(
        default=8, metadata={"help": "n: positions per document (one per equal chunk of the valid tokens)."}
    )
    nsp_rollout_length: int = field(default=5, metadata={"help": "k: tokens per rollout (EOS does not stop it)."})
    nsp_num_rollouts: int = field(default=1, metadata={"help": "G: rollouts sampled from each prefix."})
    nsp_selection: str = field(
        default="entropy",
        metadata={
            "help": "Position selection: entropy (sample ∝ softmax(smoothed entropy/τ)), uniform, argmax, argmin."
        },
    )
    nsp_smoothing_width: int | None = field(
        default=None,
        metadata={"help": "Moving-average width for the entropy; None = k if k is odd else k+1 (official). 1 = off."},
    )
    nsp_selection_temperature: float = field(
        default=1.0, metadata={"help": "τ in softmax(smoothed entropy / τ) for the entropy strategy."}
    )
    nsp_margin: int = field(
        default=20,
        metadata={
            "help": "Continuations start at least this many tokens after the document start and before its end."
        },
    )
    nsp_reward: str = field(
        default="cosine",
        metadata={
            "help": "Built-in reward when reward_funcs is not given: cosine, exact (token match fraction), hybrid."
        },
    )
    nsp_group_by: str = field(
        default="auto",
        metadata={
            "help": "GRPO group: 'auto' (official: the G rollouts of a prefix when G > 1, the document's n rollouts "
            "when G = 1), 'document' (all n·G rollouts of a document) or 'prefix' (the G rollouts of a prefix)."
        },
    )
    nsp_sample_eos: bool = field(
        default=False,
        metadata={
            "help": "Let rollouts sample EOS. Default False (official): EOS is masked out of the sampling "
            "distribution (min_new_tokens = k); old log-probs come from the unmasked distribution either way."
        },
    )
    ntp_coef: float = field(default=1.0, metadata={"help": "Weight of the next-token CE on the whole document."})
    ntp_count_pad_targets: bool = field(
        default=False,
        metadata={
            "help": "Count the padding of a batch in the NTP term, as inputs and as targets, over all its positions "
            "(the release's fla DeltaNet loss, labels = input_ids); costs one more forward per micro-batch when "
            "rollouts run (an NTP-only step, nsp_coef = 0, runs this one forward instead of its plain ones). Default "
            "False: only real next tokens count, so a document's loss does not depend on its batch "
            "(docs/faithfulness.md)."
        },
    )
    nsp_coef: float = field(default=0.2, metadata={"help": "Weight of the PPO-clip next-sequence term."})
    nsp_engine: str = field(
        default="auto",
        metadata={
            "help": "Rollout engine: auto (onepass where it applies, else snapshot when the model supports it, else "
            "generic; logs which and why), generic, snapshot, onepass (the snapshot engine with one document pass "
            "instead of n+1 segments: the reference DeltaNet, LaCT, fla DeltaNet and GatedDeltaNet; not with "
            "nsp_segment_checkpointing)."
        },
    )
    nsp_reuse_sampling_pass: bool = field(
        default=True,
        metadata={
            "help": "Snapshot engine: run the sampling segments with gradients and reuse them for the loss (n+1 model "
            "calls and one document pass fewer per step; same rollouts, losses and gradients). Applies when "
            "steps_per_generation = num_iterations = 1 and the model is not sharded by FSDP2; uses the memory of "
            "the loss pass during sampling."
        },
    )
    nsp_fuse_scan: bool = field(
        default=True,
        metadata={
            "help": "One-pass engine, with the sampling pass reused (nsp_reuse_sampling_pass): compute the scan's "
            "entropies from the loss's document forward, which keeps what gives the states at positions chosen "
            "after it, instead of a no-grad forward of its own (one document forward per step instead of two; same "
            "positions, rollouts, losses and gradients). Models with supports_deferred_states (the reference "
            "DeltaNet, LaCT) and fla DeltaNet / GatedDeltaNet with the boundary provider; elsewhere the step scans as "
            "before."
        },
    )
    nsp_generic_rows_per_call: int | None = field(
        default=None, metadata={"help": "Generic engine: rollout rows per no-grad model call (None = all at once)."}
    )
    nsp_prompt_tail_tokens: int = field(
        default=64,
        metadata={
            "help": "Prefix tokens decoded into the `prompts` text given to rewards and logs (full ids: prefix_ids)."
        },
    )
    fla_gated_kernel: str = field(
        default="fla",
        metadata={
            "help": "Kernel of fla's GatedDeltaNet layers during training, evaluation and test-time adaptation: 'fla' "
            "(default, fla's own), 'trl_refine' (our gated chunk kernel, same math, whose backward fla 0.6.0 does "
            "not refuse on Hopper with 3.4.0 <= triton < 3.7.1, fla #640; fla GatedDeltaNet models only, checked at "
            "construction) or 'auto' (trl_refine exactly where fla would refuse, else fla; logs which and why). "
            "docs/models.md, docs/faithfulness.md."
        },
    )

    @property
    def smoothing_width(self) -> int:
        return self.nsp_smoothing_width or default_smoothing_width(self.nsp_rollout_length)

    @property
    def min_document_length(self) -> int:
        return min_document_length(self.nsp_num_chunks, self.nsp_rollout_length, self.nsp_margin)

    @property
    def group_by(self) -> str:
        """The grouping in effect (``auto`` resolved): ``document`` or ``prefix``."""
        return resolve_group_by(self.nsp_group_by, self.nsp_num_rollouts)

    @property
    def group_size(self) -> int:
        """Rollouts per GRPO group."""
        if self.group_by == "prefix":
            return self.nsp_num_rollouts
        return self.nsp_num_chunks * self.nsp_num_rollouts

    def validate_refine(self) -> None:
        """Checks of the ReFINE step's fields (every config that holds them calls this)."""

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}.")

        choice("nsp_selection", SELECTION_STRATEGIES)
        choice("nsp_reward", REWARDS)
        choice("nsp_group_by", GROUPINGS)
        choice("nsp_engine", ENGINES)
        check_fla_gated_kernel(self.fla_gated_kernel)
        for name in ("nsp_num_chunks", "nsp_rollout_length", "nsp_num_rollouts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.nsp_margin < 1:
            raise ValueError(f"nsp_margin must be >= 1 (a prefix needs at least one token), got {self.nsp_margin}.")
        if self.nsp_smoothing_width is not None and self.nsp_smoothing_width < 1:
            raise ValueError("nsp_smoothing_width must be >= 1 (1 disables smoothing) or None for the official rule.")
        if self.nsp_selection_temperature <= 0:
            raise ValueError("nsp_selection_temperature must be > 0.")
        if self.ntp_coef < 0 or self.nsp_coef < 0:
            raise ValueError("ntp_coef and nsp_coef must be >= 0.")
        if self.ntp_coef == 0 and self.nsp_coef == 0:
            raise ValueError("ntp_coef and nsp_coef are both 0: nothing to train. Set at least one > 0.")
        if self.nsp_group_by == "prefix" and self.nsp_num_rollouts < 2:
            raise ValueError(
                "nsp_group_by='prefix' compares the G rollouts of one prefix, so it needs nsp_num_rollouts >= 2 "
                f"(got {self.nsp_num_rollouts}). Set nsp_num_rollouts=8, or nsp_group_by='auto' (official)."
            )
        if self.group_by == "document" and self.nsp_num_chunks * self.nsp_num_rollouts < 2:
            raise ValueError(
                "nsp_group_by='document' needs at least 2 rollouts per document: raise nsp_num_chunks or "
                "nsp_num_rollouts."
            )
        if self.nsp_generic_rows_per_call is not None and self.nsp_generic_rows_per_call < 1:
            raise ValueError("nsp_generic_rows_per_call must be >= 1 or None.")
        if self.nsp_prompt_tail_tokens < 0:
            raise ValueError("nsp_prompt_tail_tokens must be >= 0.")


@dataclass
class NSPGRPOConfig(RefineFields, GRPOConfig):
    r"""Configuration for [`NSPGRPOTrainer`] (ReFINE, arXiv 2602.16704).

    Defaults reproduce the official release (mid-training: n=8 positions, k=5 tokens, G=1 rollout per position,
    entropy selection, cosine reward, group = document, loss = 1.0·NTP + 0.2·PPO-clip, lr 1e-6, constant schedule).
    """

    document_column: str = field(default="text", metadata={"help": "Dataset column holding the raw documents."})
    nsp_max_length: int | None = field(
        default=16384, metadata={"help": "Documents are truncated (right) to this many tokens; None = no limit."}
    )
    nsp_min_length: int | None = field(
        default=None,
        metadata={
            "help": "Drop documents with fewer tokens (counted before truncation to nsp_max_length). The paper "
            "mid-trains on documents of >= 16K tokens (the paper-setting YAMLs set 16384). None = keep every document "
            "long enough for ReFINE (nsp_short_documents)."
        },
    )
    nsp_add_special_tokens: bool = field(
        default=False,
        metadata={
            "help": "Tokenize documents with the tokenizer's special tokens (BOS/EOS). Default False (official: raw "
            "text, add_special_tokens=False)."
        },
    )
    nsp_short_documents: str = field(
        default="error",
        metadata={"help": "Documents shorter than margin + n·k + max(k, margin) tokens: 'error' (default) or 'drop'."},
    )
    documents_per_device: int | None = field(
        default=None,
        metadata={"help": "Documents per device per micro-step; sets per_device_train_batch_size = this · n · G."},
    )
    nsp_on_divergence: str = field(
        default="stop",
        metadata={
            "help": "A non-finite loss, gradient or entropy: 'stop' the run before anything is saved (naming the step "
            "and the last good checkpoint), or 'skip' the optimizer step (the weights stay as they were)."
        },
    )
    nsp_segment_checkpointing: bool = field(
        default=False,
        metadata={"help": "Snapshot engine: recompute each segment in the backward to save activation memory."},
    )

    # ---- TRL fields whose defaults differ for ReFINE -----------------------------------------------------------------
    num_generations: int | None = field(
        default=None, metadata={"help": "Derived: n·G. Leave unset; set nsp_num_chunks / nsp_num_rollouts instead."}
    )
    num_generations_eval: int | None = field(default=None, metadata={"help": "Derived: n·G."})
    per_device_train_batch_size: int | None = field(
        default=None, metadata={"help": "Rollout rows per device; derived from documents_per_device (default 1)."}
    )
    per_device_eval_batch_size: int | None = field(
        default=None, metadata={"help": "Rollout rows per device in eval; default = per_device_train_batch_size."}
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "Official: 1e-6 (verl default)."})
    weight_decay: float = field(default=0.01, metadata={"help": "Official: 0.01."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Official: constant, no warmup."})
    loss_type: str = field(
        default="bnpo", metadata={"help": "Official: token-mean over the micro-batch's rollout tokens = TRL 'bnpo'."}
    )
    delta: float | None = field(
        default=3.0, metadata={"help": "Upper bound on the ratio for negative advantages (official dual-clip c = 3)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of activation_checkpointing (off by default: HF checkpointing drops recurrent "
            "caches in training, see docs/engines.md)."
        },
    )
    max_completion_length: int | None = field(default=None, metadata={"help": "Derived: nsp_rollout_length."})
    remove_unused_columns: bool | None = field(default=False, metadata={"help": "Must stay False."})

    def __post_init__(self):
        check_field_types(self)
        check_batch_ranges(self)
        self._validate_nsp()
        check_grpo_options(self)
        rows = self.nsp_num_chunks * self.nsp_num_rollouts
        for name in ("num_generations", "num_generations_eval"):
            value = getattr(self, name)
            if value is not None and value != rows:
                raise ValueError(
                    f"{name}={value} conflicts with ReFINE's rows per document n·G = {self.nsp_num_chunks}·"
                    f"{self.nsp_num_rollouts} = {rows}. Leave {name} unset and choose nsp_num_chunks / "
                    "nsp_num_rollouts instead."
                )
            setattr(self, name, rows)
        if self.per_device_train_batch_size is None:
            self.per_device_train_batch_size = (self.documents_per_device or 1) * rows
        elif (
            self.documents_per_device is not None
            and self.per_device_train_batch_size != self.documents_per_device * rows
        ):
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} contradicts documents_per_device="
                f"{self.documents_per_device} (× n·G = {rows}). Set only documents_per_device."
            )
        if self.per_device_train_batch_size % rows != 0:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} must hold whole documents: a multiple "
                f"of n·G = {rows} rollout rows. Set documents_per_device instead (e.g. documents_per_device=1)."
            )
        self.documents_per_device = self.per_device_train_batch_size // rows
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = self.per_device_train_batch_size
        if self.per_device_eval_batch_size % rows != 0:
            raise ValueError(
                f"per_device_eval_batch_size={self.per_device_eval_batch_size} must be a multiple of n·G = {rows}."
            )
        if self.max_completion_length is not None and self.max_completion_length != self.nsp_rollout_length:
            raise ValueError(
                f"max_completion_length={self.max_completion_length} conflicts with nsp_rollout_length="
                f"{self.nsp_rollout_length}; set nsp_rollout_length only."
            )
        self.max_completion_length = self.nsp_rollout_length
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns=True would drop the document column; leave it False.")
        self.remove_unused_columns = False
        self.mask_truncated_completions = False  # rollouts never end with EOS; masking would zero them all
        super().__post_init__()
        check_grpo_choices(self)

    def _validate_nsp(self) -> None:
        self.validate_refine()
        if self.nsp_on_divergence not in DIVERGENCE_POLICIES:
            raise ValueError(
                f"nsp_on_divergence={self.nsp_on_divergence!r} is not one of {', '.join(DIVERGENCE_POLICIES)}."
            )
        if self.nsp_short_documents not in SHORT_DOCUMENT_POLICIES:
            raise ValueError(
                f"nsp_short_documents={self.nsp_short_documents!r} is not one of {', '.join(SHORT_DOCUMENT_POLICIES)}."
            )
        if self.temperature != 1.0:
            raise ValueError(
                f"temperature={self.temperature}: ReFINE samples at temperature 1, and TRL's fused LM head would also "
                "temper the NTP loss and the selection entropy. Leave temperature=1.0."
            )
        if self.use_vllm:
            raise ValueError(
                "use_vllm=True is not supported: ReFINE rolls out with its own engines. Set use_vllm=False."
            )
        if self.nsp_max_length is not None and self.nsp_max_length < min_document_length(
            self.nsp_num_chunks, self.nsp_rollout_length, self.nsp_margin
        ):
            raise ValueError(
                f"nsp_max_length={self.nsp_max_length} is shorter than the minimum document length "
                f"{min_document_length(self.nsp_num_chunks, self.nsp_rollout_length, self.nsp_margin)} "
                "(margin + n·k + max(k, margin)). Raise nsp_max_length or lower nsp_num_chunks / nsp_margin."
            )
        if self.nsp_min_length is not None and self.nsp_min_length < 1:
            raise ValueError(f"nsp_min_length must be >= 1 or None, got {self.nsp_min_length}.")
        if (
            self.nsp_min_length is not None
            and self.nsp_max_length is not None
            and self.nsp_min_length > self.nsp_max_length
        ):
            raise ValueError(
                f"nsp_min_length={self.nsp_min_length} > nsp_max_length={self.nsp_max_length}: documents are "
                "truncated to nsp_max_length, so none would qualify. Lower nsp_min_length or raise nsp_max_length."
            )

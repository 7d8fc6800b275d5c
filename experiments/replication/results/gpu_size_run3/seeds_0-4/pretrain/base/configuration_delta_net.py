"""Configuration of the pure-PyTorch reference DeltaNet.

The field names and defaults are exactly those of fla 0.6.0's ``fla.models.DeltaNetConfig``, so an fla
``config.json`` (``model_type: delta_net``) loads into :class:`RefDeltaNetConfig` unchanged. Only the
``model_type`` differs (``refine_delta_net``), so that registering this class with the ``Auto*`` factories never
clobbers fla's own registration of ``delta_net``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from transformers import PretrainedConfig

FLA_MODEL_TYPE = "delta_net"

_QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")
_QK_NORMS = ("l2", "sum")
_ATTN_MODES = ("chunk", "fused_recurrent")


class RefDeltaNetConfig(PretrainedConfig):
    """Config of :class:`~trl_refine.models.delta_net.RefDeltaNetForCausalLM` (fla ``DeltaNetConfig`` fields).

    Fields that only select fla kernels (``attn_mode``, ``fuse_norm``, ``fuse_swiglu``, ``fuse_cross_entropy``,
    ``fuse_linear_cross_entropy``) are accepted and do not change the math of the reference model (``fuse_norm``
    selects the fused pre-norm residual rounding of fla, which only matters below fp32). ``use_output_norm`` is
    accepted and, like in fla 0.6.0, ignored: the DeltaNet layer always applies its output norm.

    Values the reference cannot reproduce raise :class:`ValueError` at construction: hybrid attention layers
    (``attn``), attention residuals (``attnres_block_size``), ``hidden_act`` other than ``"swish"`` and
    ``use_l2warp``.
    """

    model_type = "refine_delta_net"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        attn_mode: str = "chunk",
        hidden_size: int = 2048,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        use_gate: bool = False,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        use_beta: bool = True,
        use_output_norm: bool = True,
        num_heads: int = 16,
        qk_norm: str = "l2",
        qk_activation: str = "silu",
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        num_hidden_layers: int = 24,
        norm_eps: float = 1e-6,
        attn: Any = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = False,
        vocab_size: int = 32000,
        attnres_block_size: int | None = None,
        **kwargs,
    ):
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.use_gate = use_gate
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_beta = use_beta
        self.use_output_norm = use_output_norm
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.qk_activation = qk_activation
        self.max_position_embeddings = max_position_embeddings

        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.norm_eps = norm_eps
        self.attn = attn
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.allow_neg_eigval = allow_neg_eigval
        self.attnres_block_size = attnres_block_size

        self._validate_reference_fields()

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # ------------------------------------------------------------------ validation
    def _validate_reference_fields(self) -> None:
        def bad(field: str, value: Any, fix: str) -> ValueError:
            return ValueError(f"RefDeltaNetConfig: unsupported {field}={value!r}. {fix}")

        if self.attn is not None:
            raise bad(
                "attn",
                self.attn,
                "The reference DeltaNet has no hybrid attention layers; set attn=None (pure DeltaNet), "
                "or use fla's DeltaNetForCausalLM (GPU) for hybrid checkpoints.",
            )
        if self.attnres_block_size is not None:
            raise bad(
                "attnres_block_size",
                self.attnres_block_size,
                "Attention residuals are not implemented in the reference; set attnres_block_size=None.",
            )
        if self.attn_mode not in _ATTN_MODES:
            raise bad("attn_mode", self.attn_mode, f"Use one of {_ATTN_MODES} (both give the same math here).")
        if self.qk_activation not in _QK_ACTIVATIONS:
            raise bad("qk_activation", self.qk_activation, f"Use one of {_QK_ACTIVATIONS}.")
        if self.qk_norm not in _QK_NORMS:
            raise bad("qk_norm", self.qk_norm, f"Use one of {_QK_NORMS}.")
        if self.hidden_act != "swish":
            raise bad(
                "hidden_act",
                self.hidden_act,
                "The reference MLP is SwiGLU only; set hidden_act='swish' ('powlu' is not implemented).",
            )
        if self.use_l2warp:
            raise bad(
                "use_l2warp", self.use_l2warp, "The reference loss is plain cross-entropy; set use_l2warp=False."
            )
        if self.fuse_cross_entropy and self.fuse_linear_cross_entropy:
            raise ValueError(
                "RefDeltaNetConfig: `fuse_cross_entropy` and `fuse_linear_cross_entropy` cannot be True at the same "
                "time (same rule as fla); set one of them to False."
            )
        for name in ("hidden_size", "num_heads", "num_hidden_layers", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, value, f"{name} must be a positive integer.")
        if self.use_short_conv and (
            isinstance(self.conv_size, bool) or not isinstance(self.conv_size, int) or self.conv_size < 1
        ):
            raise bad("conv_size", self.conv_size, "conv_size must be a positive integer.")
        for field, expand in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            dim = self.hidden_size * expand
            if dim <= 0 or not math.isclose(dim, round(dim)):
                raise bad(field, expand, f"hidden_size * {field} must be a positive integer (got {dim}).")
            if round(dim) % self.num_heads != 0:
                raise bad(
                    field,
                    expand,
                    f"hidden_size * {field} = {round(dim)} must be divisible by num_heads={self.num_heads}.",
                )
        if self.intermediate_size is not None and (
            isinstance(self.intermediate_size, bool)
            or not isinstance(self.intermediate_size, int)
            or self.intermediate_size <= 0
        ):
            raise bad("intermediate_size", self.intermediate_size, "Use a positive integer or None (fla's rule).")

    # ------------------------------------------------------------------ derived sizes (as fla computes them)
    @property
    def key_dim(self) -> int:
        return round(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return round(self.hidden_size * self.expand_v)

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def mlp_intermediate_size(self) -> int:
        """``intermediate_size``, or fla's rule (``fla/modules/mlp.py``) when it is None."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden_ratio = 4 if self.hidden_ratio is None else self.hidden_ratio
        size = int(self.hidden_size * hidden_ratio * 2 / 3)
        return 256 * ((size + 256 - 1) // 256)

    # ------------------------------------------------------------------ fla interop
    @classmethod
    def from_fla_config(cls, fla_config: Any, **overrides) -> RefDeltaNetConfig:
        """Build a reference config from an fla ``DeltaNetConfig`` (object) or its dict / ``config.json`` content."""
        if isinstance(fla_config, PretrainedConfig):
            config_dict = fla_config.to_dict()
        elif isinstance(fla_config, dict):
            config_dict = dict(fla_config)
        else:
            raise TypeError(f"Expected an fla DeltaNetConfig or a dict, got {type(fla_config).__name__}.")
        model_type = config_dict.pop("model_type", None)
        if model_type not in (None, FLA_MODEL_TYPE, cls.model_type):
            raise ValueError(
                f"RefDeltaNetConfig.from_fla_config: model_type={model_type!r} is not a DeltaNet config "
                f"(expected {FLA_MODEL_TYPE!r})."
            )
        for key in ("architectures", "transformers_version", "auto_map"):
            config_dict.pop(key, None)
        config_dict.update(overrides)
        return cls(**config_dict)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        # fla checkpoints say model_type "delta_net": same fields, so accept them silently.
        if config_dict.get("model_type") == FLA_MODEL_TYPE:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Like ``PretrainedConfig.from_pretrained``; also reads fla ``delta_net`` configs (without a warning)."""
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls.from_dict(config_dict, **kwargs)


__all__ = ["RefDeltaNetConfig"]

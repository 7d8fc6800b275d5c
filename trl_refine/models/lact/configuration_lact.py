"""Configuration of the LaCT-SwiGLU language model (``model_type="lact_swiglu"``).

The field names and defaults are those of the published ``LaCTSWIGLUConfig`` (LaCT, arXiv 2505.23884), so a
``config.json`` of a released checkpoint loads unchanged. Every field is either honoured or, where a value cannot be
honoured, rejected with a ``ValueError`` that names the field and the fix. See ``docs/lact.md``.
"""

from __future__ import annotations

import math
import warnings

from transformers.configuration_utils import PreTrainedConfig

__all__ = ["LaCTConfig", "LaCTSWIGLUConfig"]

#: fields that only select training kernels upstream (fused norm / swiglu / cross-entropy); they change no maths
KERNEL_SWITCHES = ("fuse_norm", "last_layer_fuse_norm", "fuse_swiglu", "fuse_cross_entropy")

_MUON_DTYPES = ("bfloat16", "float32")


def _bad(field: str, value, why: str, fix: str) -> ValueError:
    return ValueError(f"LaCTConfig.{field}={value!r} is not supported: {why}. Fix: {fix}.")


class LaCTConfig(PreTrainedConfig):
    r"""Configuration of a LaCT-SwiGLU decoder: sliding-window attention plus a chunked fast-weight SwiGLU branch.

    Published fields (defaults of the reference config class):

    * ``hidden_size`` (2048), ``num_hidden_layers`` (24), ``num_attn_heads`` (32, SWA heads, MHA),
      ``num_lact_heads`` (4, fast-weight heads; head dim ``hidden_size // num_lact_heads``), ``inter_multi`` (1;
      fast-weight hidden dim ``int(head_dim * inter_multi)``).
    * ``lact_chunk_size`` (2048), ``window_size`` (2048), ``w0_w2_low_rank`` (-1 = full rank, r > 0 = low rank
      ``w_left @ w_right + 0.5 I``), ``fw_init_gain`` (0.5, init only).
    * ``qkv_bias`` (False), ``attn_qk_norm`` (False), ``qkv_silu`` (True), ``no_v_silu`` (False, upstream-HEAD
      field: skip the silu on the fast value), ``lr_dim`` (1), ``lr_parameterization`` ("mamba"),
      ``learnable_ttt_scale`` (True), ``use_momentum`` (True), ``use_muon`` (False), ``ttt_loss_type``
      ("dot_product"), ``ttt_prenorm`` (False), ``ttt_nope`` (False), ``fp32_states`` (False, upstream-HEAD field:
      keep the fast weights in float32), ``use_fused_kernel`` (False, upstream-HEAD Triton switch).
    * ``rope_theta`` (1e4), ``max_position_embeddings`` (2048; RoPE is computed from positions, so this only
      documents the trained context), ``hidden_ratio`` (4), ``intermediate_size`` (None), ``hidden_act``
      ("swish"), ``norm_eps`` (1e-6), ``vocab_size`` (32000), ``tie_word_embeddings`` (False), special token ids.
    * ``initializer_range`` (0.006) and ``elementwise_affine`` (True) only matter for fresh initialisation
      (the reference ignores ``elementwise_affine``: its norms always have a weight, and so do ours).
    * ``fuse_norm``, ``last_layer_fuse_norm``, ``fuse_swiglu``, ``fuse_cross_entropy``: kernel switches of the
      reference with no effect on the maths; accepted and stored, the PyTorch path is always used.
    * ``attention_bias``: present in the published 760M ``config.json`` but read by nothing upstream; must be
      False (the qkv bias is ``qkv_bias``).

    Field of this implementation (not published):

    * ``muon_dtype`` ("bfloat16"): dtype of the Newton-Schulz iteration when ``use_muon``. The reference always
      runs it in bfloat16; "float32" is far more reproducible (bf16 Newton-Schulz amplifies summation-order noise
      to ~1e-2) and is what the CPU parity tests use.
    """

    model_type = "lact_swiglu"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_attention_heads": "num_attn_heads"}

    def __init__(
        self,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_attn_heads: int = 32,
        num_lact_heads: int = 4,
        inter_multi: float = 1,
        qkv_bias: bool = False,
        attn_qk_norm: bool = False,
        lact_chunk_size: int = 2048,
        use_muon: bool = False,
        lr_dim: int = 1,
        qkv_silu: bool = True,
        no_v_silu: bool = False,
        lr_parameterization: str = "mamba",
        learnable_ttt_scale: bool = True,
        use_momentum: bool = True,
        ttt_loss_type: str = "dot_product",
        ttt_prenorm: bool = False,
        ttt_nope: bool = False,
        w0_w2_low_rank: int = -1,
        window_size: int = 2048,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        hidden_ratio: float | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        initializer_range: float = 0.006,
        elementwise_affine: bool | None = True,
        norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        fuse_norm: bool = True,
        last_layer_fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        vocab_size: int = 32000,
        fw_init_gain: float = 0.5,
        use_fused_kernel: bool = False,
        fp32_states: bool = False,
        attention_bias: bool = False,
        muon_dtype: str = "bfloat16",
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attn_heads = num_attn_heads
        self.num_lact_heads = num_lact_heads
        self.inter_multi = inter_multi
        self.qkv_bias = qkv_bias
        self.attn_qk_norm = attn_qk_norm
        self.lact_chunk_size = lact_chunk_size
        self.use_muon = use_muon
        self.lr_dim = lr_dim
        self.qkv_silu = qkv_silu
        self.no_v_silu = no_v_silu
        self.lr_parameterization = lr_parameterization
        self.learnable_ttt_scale = learnable_ttt_scale
        self.use_momentum = use_momentum
        self.ttt_loss_type = ttt_loss_type
        self.ttt_prenorm = ttt_prenorm
        self.ttt_nope = ttt_nope
        self.w0_w2_low_rank = w0_w2_low_rank
        self.window_size = window_size
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.elementwise_affine = elementwise_affine
        self.norm_eps = norm_eps
        self.use_cache = use_cache
        self.fuse_norm = fuse_norm
        self.last_layer_fuse_norm = last_layer_fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.vocab_size = vocab_size
        self.fw_init_gain = fw_init_gain
        self.use_fused_kernel = use_fused_kernel
        self.fp32_states = fp32_states
        self.attention_bias = attention_bias
        self.muon_dtype = muon_dtype
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_lact()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        """Sliding-window attention head dim (``hidden_size // num_attn_heads``)."""
        return self.hidden_size // self.num_attn_heads

    @property
    def fw_head_dim(self) -> int:
        """Fast-weight head dim ``d = hidden_size // num_lact_heads``."""
        return self.hidden_size // self.num_lact_heads

    @property
    def fw_hidden_dim(self) -> int:
        """Fast-weight SwiGLU hidden dim ``d_h = int(d * inter_multi)``."""
        return int(self.fw_head_dim * self.inter_multi)

    @property
    def low_rank(self) -> int | None:
        """Rank of the low-rank W0/W2 initial weights, or None for full rank."""
        return int(self.w0_w2_low_rank) if self.w0_w2_low_rank is not None and self.w0_w2_low_rank > 0 else None

    @property
    def mlp_intermediate_size(self) -> int:
        """The SwiGLU MLP width: ``intermediate_size`` or ``256 * ceil(int(D * hidden_ratio * 2 / 3) / 256)``."""
        if self.intermediate_size is not None:
            return int(self.intermediate_size)
        inter = int(self.hidden_size * self.hidden_ratio * 2 / 3)
        return 256 * ((inter + 256 - 1) // 256)

    # ------------------------------------------------------------------ validation
    def validate_lact(self) -> None:
        """Reject every value this implementation cannot honour (a ``ValueError`` naming the field and the fix)."""
        d, h, n = self.hidden_size, self.num_attn_heads, self.num_lact_heads
        for field in ("hidden_size", "num_hidden_layers", "num_attn_heads", "num_lact_heads", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(field, value, "it must be a positive integer", f"set {field} to a positive integer")
        if d % h:
            raise _bad("num_attn_heads", h, f"hidden_size={d} is not divisible by it", "use a divisor of hidden_size")
        if (d // h) % 2:
            raise _bad(
                "num_attn_heads", h, f"the attention head dim {d // h} is odd and RoPE needs an even one", "change it"
            )
        if d % n:
            raise _bad("num_lact_heads", n, f"hidden_size={d} is not divisible by it", "use a divisor of hidden_size")
        if not (isinstance(self.inter_multi, (int, float)) and self.inter_multi > 0 and self.fw_hidden_dim >= 1):
            raise _bad("inter_multi", self.inter_multi, "it must give a fast-weight hidden dim >= 1", "use e.g. 1")
        for field in ("lact_chunk_size", "window_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                why = "it must be a positive integer"
                if field == "window_size" and value is None:
                    why = "full (unwindowed) attention is not implemented: the decode state keeps a fixed window"
                raise _bad(field, value, why, f"set {field} to a positive integer (the published value is 2048)")
        if self.w0_w2_low_rank is None or not isinstance(self.w0_w2_low_rank, int):
            raise _bad("w0_w2_low_rank", self.w0_w2_low_rank, "it must be an int", "use -1 (full rank) or r > 0")
        if self.lr_dim != 1:
            raise _bad(
                "lr_dim",
                self.lr_dim,
                "only one learning rate per fast-weight matrix and head is implemented (as in every published config)",
                "set lr_dim=1",
            )
        if str(self.lr_parameterization).lower() != "mamba":
            raise _bad(
                "lr_parameterization",
                self.lr_parameterization,
                "only 'mamba' exists",
                "set lr_parameterization='mamba'",
            )
        if self.ttt_loss_type != "dot_product":
            raise _bad(
                "ttt_loss_type",
                self.ttt_loss_type,
                "only 'dot_product' is implemented",
                "set ttt_loss_type='dot_product'",
            )
        if self.hidden_act not in ("swish", "silu"):
            raise _bad("hidden_act", self.hidden_act, "the MLP is a SwiGLU", "set hidden_act='swish'")
        if self.rope_theta is None or not self.rope_theta > 0:
            raise _bad("rope_theta", self.rope_theta, "RoPE needs a positive base", "set rope_theta (e.g. 1e6)")
        if not self.norm_eps > 0:
            raise _bad("norm_eps", self.norm_eps, "it must be positive", "set norm_eps=1e-6")
        if self.attention_bias:
            raise _bad(
                "attention_bias",
                self.attention_bias,
                "LaCT reads its qkv bias from qkv_bias; attention_bias is read by nothing upstream",
                "set attention_bias=False and qkv_bias as intended",
            )
        if self.muon_dtype not in _MUON_DTYPES:
            raise _bad("muon_dtype", self.muon_dtype, f"it must be one of {_MUON_DTYPES}", "use 'bfloat16'")
        if self.intermediate_size is None and (self.hidden_ratio is None or not self.hidden_ratio > 0):
            raise _bad("hidden_ratio", self.hidden_ratio, "no intermediate_size is given", "set hidden_ratio=4")
        if self.use_fused_kernel:
            warnings.warn(
                "LaCTConfig.use_fused_kernel=True selects upstream's Triton TTT kernel, which trl_refine does not "
                "ship; the PyTorch chunked path (same update rule) is used instead.",
                stacklevel=3,
            )
        if not math.isfinite(float(self.fw_init_gain)):
            raise _bad("fw_init_gain", self.fw_init_gain, "it must be finite", "use 0.5")


#: the reference's class name
LaCTSWIGLUConfig = LaCTConfig

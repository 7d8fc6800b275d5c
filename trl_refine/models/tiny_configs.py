"""Small random-init configs of every model family the snapshot engine serves, for trying a family without a
checkpoint (the recipes' ``tiny_model_type``) and for the equivalence tests.

Each hybrid has both of its layer kinds (one linear-recurrent layer, then one attention layer, repeating) and a
dense MLP (mixture-of-experts blocks are turned off: they do not change the cache). Sizes: ``hidden`` with
``heads`` heads of ``hidden // heads``.
"""

from __future__ import annotations

#: transformers hybrids (linear-recurrent + attention layers); run on CPU with torch fallbacks
TRANSFORMERS_HYBRIDS = ("qwen3_next", "kimi_linear", "falcon_h1", "bamba", "granitemoehybrid", "lfm2")
#: transformers' pure state-space models (``Mamba2ForCausalLM``, ``MambaForCausalLM``; model types ``mamba2`` and
#: ``mamba``, prefixed here because fla's Mamba models share those names); run on CPU with torch fallbacks
TRANSFORMERS_SSMS = ("transformers_mamba2", "transformers_mamba")
#: flash-linear-attention families (Triton kernels: GPU only)
FLA_FAMILIES = (
    "delta_net", "gated_deltanet", "gla", "gated_deltaproduct", "kda", "mamba2", "mamba", "rwkv7", "hgrn2", "gsa",
    "hgrn", "comba",
)  # fmt: skip
#: fla hybrids: an fla family with fla `Attention` layers (``config.attn``: every second layer, ``heads`` query
#: heads, half as many K/V heads), named ``<family>_hybrid``; fla's Attention needs flash_attn
FLA_HYBRIDS = ("gla_hybrid", "delta_net_hybrid")


def _alternating(layers: int, recurrent: str, attention: str) -> list[str]:
    return [recurrent if i % 2 == 0 else attention for i in range(layers)]


def tiny_config(
    model_type: str,
    *,
    vocab_size: int,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    pad_token_id: int | None = 0,
    eos_token_id: int | None = 1,
):
    """The config of a small random ``model_type`` model (one of `TRANSFORMERS_HYBRIDS`, `TRANSFORMERS_SSMS`,
    `FLA_FAMILIES`, `FLA_HYBRIDS`; ``heads`` is unused by ``transformers_mamba``).

    Without CUDA, ``qwen3_next`` and ``kimi_linear`` are switched to transformers' PyTorch kernels (with fla
    installed transformers binds fla's Triton kernels, which need a GPU): `use_transformers_torch_kernels`."""
    if model_type in ("qwen3_next", "kimi_linear"):
        import torch

        if not torch.cuda.is_available():
            from trl_refine._compat import use_transformers_torch_kernels

            use_transformers_torch_kernels(model_type)
    head_dim = hidden_size // heads
    ids = dict(pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, **ids)
    attn = dict(num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), intermediate_size=2 * hidden_size)
    mamba = dict(mamba_n_heads=heads * 2, mamba_d_head=head_dim, mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4)
    if model_type == "qwen3_next":
        from transformers import Qwen3NextConfig

        return Qwen3NextConfig(
            **common, **attn, head_dim=head_dim, linear_num_value_heads=heads, linear_num_key_heads=max(heads // 2, 1),
            linear_key_head_dim=head_dim, linear_value_head_dim=head_dim, num_experts=0,
            moe_intermediate_size=hidden_size, shared_expert_intermediate_size=hidden_size,
            mlp_only_layers=list(range(layers)), layer_types=_alternating(layers, "linear_attention", "full_attention"),
        )  # fmt: skip
    if model_type == "kimi_linear":
        from transformers import KimiLinearConfig

        kda = [i + 1 for i in range(layers) if i % 2 == 0]  # 1-based, as in the released configs
        full = [i + 1 for i in range(layers) if i % 2 == 1]
        return KimiLinearConfig(
            **common, **{**attn, "num_key_value_heads": heads}, head_dim=head_dim, q_lora_rank=None, kv_lora_rank=head_dim,
            qk_nope_head_dim=head_dim // 2, qk_rope_head_dim=head_dim // 2, v_head_dim=head_dim, num_experts=0,
            first_k_dense_replace=layers,
            linear_attn_config={"kda_layers": kda, "full_attn_layers": full, "num_heads": heads, "head_dim": head_dim,
                                "short_conv_kernel_size": 4},
        )  # fmt: skip
    if model_type == "falcon_h1":
        from transformers import FalconH1Config

        return FalconH1Config(
            **common, **attn, head_dim=head_dim, mamba_d_ssm=hidden_size, mamba_n_heads=heads * 2,
            mamba_d_head=hidden_size // (heads * 2), mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4,
            mamba_chunk_size=64,
        )  # fmt: skip
    if model_type == "bamba":
        from transformers import BambaConfig

        return BambaConfig(
            **common, **attn, **mamba, mamba_chunk_size=64, attn_layer_indices=list(range(1, layers, 2))
        )
    if model_type == "granitemoehybrid":
        from transformers import GraniteMoeHybridConfig

        return GraniteMoeHybridConfig(
            **common, **attn, **mamba, mamba_chunk_size=64, num_local_experts=0,
            shared_intermediate_size=2 * hidden_size, layer_types=_alternating(layers, "mamba", "attention"),
        )  # fmt: skip
    if model_type == "lfm2":
        from transformers import Lfm2Config

        return Lfm2Config(**common, **attn, layer_types=_alternating(layers, "conv", "full_attention"))
    if model_type == "transformers_mamba2":
        from transformers import Mamba2Config

        return Mamba2Config(
            **common, num_heads=2 * heads, head_dim=hidden_size // heads, expand=2, n_groups=1, state_size=16,
            conv_kernel=4, chunk_size=64,
        )  # fmt: skip
    if model_type == "transformers_mamba":
        from transformers import MambaConfig

        return MambaConfig(**common, state_size=16, expand=2, conv_kernel=4)
    if model_type in FLA_FAMILIES or model_type in FLA_HYBRIDS:
        try:
            import fla  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"tiny_model_type={model_type!r} needs flash-linear-attention (pip install flash-linear-attention) "
                "and a GPU; on CPU use refine_delta_net or a transformers hybrid"
            ) from err
        if model_type in FLA_HYBRIDS:
            config = _fla_config(model_type.removesuffix("_hybrid"), common, heads, head_dim)
            config.attn = {
                "layers": list(range(1, layers, 2)), "num_heads": heads, "num_kv_heads": max(heads // 2, 1),
                "qkv_bias": False, "window_size": None, "rope_theta": 10000.0,
            }  # fmt: skip
            return config
        return _fla_config(model_type, common, heads, head_dim)
    raise ValueError(
        f"no tiny config for model_type {model_type!r}; choose one of "
        f"{TRANSFORMERS_HYBRIDS + TRANSFORMERS_SSMS + FLA_FAMILIES + FLA_HYBRIDS}"
    )


def _fla_config(model_type: str, common: dict, heads: int, head_dim: int):
    import fla.models as fm

    common = {**common, "fuse_cross_entropy": False, "intermediate_size": 2 * common["hidden_size"]}
    if model_type == "delta_net":
        return fm.DeltaNetConfig(**common, num_heads=heads)
    if model_type == "gated_deltanet":
        return fm.GatedDeltaNetConfig(**common, num_heads=heads, head_dim=head_dim)
    if model_type == "gla":
        return fm.GLAConfig(**common, num_heads=heads)
    if model_type == "gated_deltaproduct":
        return fm.GatedDeltaProductConfig(**common, num_heads=heads, head_dim=head_dim)
    if model_type == "kda":
        return fm.KDAConfig(**common, num_heads=heads, head_dim=head_dim)
    if model_type == "mamba2":
        common.pop("intermediate_size")
        return fm.Mamba2Config(**common, num_heads=heads * 2, head_dim=common["hidden_size"] // heads, state_size=16)
    if model_type == "mamba":
        common.pop("intermediate_size")
        return fm.MambaConfig(**common, state_size=16, expand=2, conv_kernel=4)
    if model_type == "rwkv7":
        return fm.RWKV7Config(**common, head_dim=head_dim)
    if model_type == "hgrn2":
        return fm.HGRN2Config(**common, num_heads=heads, expand_ratio=None)
    if model_type == "hgrn":
        return fm.HGRNConfig(**common)
    if model_type == "gsa":
        return fm.GSAConfig(**common, num_heads=heads, num_slots=16)
    if model_type == "comba":
        return fm.CombaConfig(**common, num_heads=heads, head_dim=head_dim)
    raise ValueError(model_type)

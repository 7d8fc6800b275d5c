"""GRPOConfig options that ReFINE does not take, refused when the config is built, with the fix.

NSPGRPOConfig inherits every field of `trl.GRPOConfig`. The ones below would be read by TRL's own generation or
reference-model code, which ReFINE replaces with its rollout engines, so instead of being silently ignored (or
crashing at the first step) they fail here.
"""

from __future__ import annotations

from typing import Any

#: field -> (the value that means "off", why it is refused and what to do); None always means off too
UNSUPPORTED_GENERATION_OPTIONS: dict[str, tuple[Any, str]] = {
    "top_p": (1.0, "ReFINE samples rollouts from the full distribution (the official release); set top_p=1.0"),
    "top_k": (0, "ReFINE samples rollouts from the full distribution (the official release); set top_k=0"),
    "min_p": (None, "ReFINE samples rollouts from the full distribution (the official release); set min_p=None"),
    "repetition_penalty": (
        1.0,
        "a repetition penalty would make the sampling policy differ from the policy whose log-probs the loss uses; "
        "set repetition_penalty=1.0",
    ),
    "generation_kwargs": (
        None,
        "rollouts come from trl_refine's engines, not model.generate(); set generation_kwargs=None "
        "(the rollout length is nsp_rollout_length)",
    ),
    "use_transformers_paged": (False, "rollouts come from trl_refine's engines; set use_transformers_paged=False"),
    "cache_implementation": (None, "rollouts come from trl_refine's engines; set cache_implementation=None"),
    "sync_ref_model": (False, "there is no reference model (beta must be 0); set sync_ref_model=False"),
}


def check_grpo_options(config: Any) -> None:
    """Raise ValueError for a GRPOConfig option that NSPGRPOTrainer would otherwise ignore or crash on."""
    if config.beta != 0.0:
        raise ValueError(
            f"beta={config.beta}: a KL penalty to a reference model is not supported by NSPGRPOTrainer (the official "
            "ReFINE release trains without one, and the rollout engines do not score a reference model). Set "
            "beta=0.0; to stay close to the initial model lower learning_rate or raise ntp_coef."
        )
    for name, (off, why) in UNSUPPORTED_GENERATION_OPTIONS.items():
        value = getattr(config, name, off)
        if value is not None and value != off and value != {}:
            raise ValueError(f"{name}={value!r} is not supported: {why}.")

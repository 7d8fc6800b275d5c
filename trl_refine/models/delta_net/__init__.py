"""Pure-PyTorch reference DeltaNet (``model_type = "refine_delta_net"``), compatible with fla 0.6.0 checkpoints.

Importing this package registers the classes with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``
(``exist_ok=True``); fla's own ``delta_net`` registration is left untouched.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_delta_net import RefDeltaNetConfig
from .modeling_delta_net import (
    RefDeltaNetForCausalLM,
    RefDeltaNetModel,
    RefDeltaNetPreTrainedModel,
    delta_rule,
    delta_rule_chunkwise,
    delta_rule_recurrent,
    fla_cache_class,
    new_cache,
)

AutoConfig.register(RefDeltaNetConfig.model_type, RefDeltaNetConfig, exist_ok=True)
AutoModel.register(RefDeltaNetConfig, RefDeltaNetModel, exist_ok=True)
AutoModelForCausalLM.register(RefDeltaNetConfig, RefDeltaNetForCausalLM, exist_ok=True)
# saved checkpoints carry this code and an ``auto_map``: they load anywhere with trust_remote_code=True
RefDeltaNetConfig.register_for_auto_class()
RefDeltaNetModel.register_for_auto_class("AutoModel")
RefDeltaNetForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "RefDeltaNetConfig",
    "RefDeltaNetForCausalLM",
    "RefDeltaNetModel",
    "RefDeltaNetPreTrainedModel",
    "delta_rule",
    "delta_rule_chunkwise",
    "delta_rule_recurrent",
    "fla_cache_class",
    "new_cache",
]

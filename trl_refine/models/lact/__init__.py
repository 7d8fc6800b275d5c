"""Clean-room LaCT-SwiGLU (``model_type="lact_swiglu"``) with a recurrent decode state.

Importing this package registers the config and models with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``. See ``docs/lact.md``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_lact import LaCTConfig, LaCTSWIGLUConfig
from .fast_weight import tokens_in_chunk
from .modeling_lact import (
    LaCTForCausalLM,
    LaCTModel,
    LaCTPreTrainedModel,
    check_lact_checkpoint,
    convert_lact_state_dict,
    infer_lact_dims,
    lact_causal_lm_loss,
)
from .state import (
    LaCTCache,
    cat_states,
    detach_states,
    map_states,
    repeat_interleave_states,
    select_states,
    share_window,
    shared_window_layout,
    snapshot_states,
    unshare_window,
)

AutoConfig.register(LaCTConfig.model_type, LaCTConfig, exist_ok=True)
AutoModel.register(LaCTConfig, LaCTModel, exist_ok=True)
AutoModelForCausalLM.register(LaCTConfig, LaCTForCausalLM, exist_ok=True)
# saved checkpoints carry this code and an ``auto_map``: they load anywhere with trust_remote_code=True
LaCTConfig.register_for_auto_class()
LaCTModel.register_for_auto_class("AutoModel")
LaCTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LaCTCache",
    "LaCTConfig",
    "LaCTForCausalLM",
    "LaCTModel",
    "LaCTPreTrainedModel",
    "LaCTSWIGLUConfig",
    "cat_states",
    "check_lact_checkpoint",
    "convert_lact_state_dict",
    "detach_states",
    "infer_lact_dims",
    "lact_causal_lm_loss",
    "map_states",
    "repeat_interleave_states",
    "select_states",
    "share_window",
    "shared_window_layout",
    "snapshot_states",
    "tokens_in_chunk",
    "unshare_window",
]

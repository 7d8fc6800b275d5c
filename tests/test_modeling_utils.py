"""trl_refine.modeling_utils: the chunked LM-head log-probs."""

import pytest
import torch

from trl_refine.modeling_utils import lm_head_logps


def test_lm_head_logps_names_the_fix_when_the_head_weight_was_released():
    """FSDP2 frees an unsharded parameter's storage on reshard; the checkpointed head recompute then fails. The error
    names the workaround instead of torch's setStorage message."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 6, bias=False)

        def get_output_embeddings(self):
            return self.head

    model = Tiny()
    hidden = torch.randn(5, 4, requires_grad=True)
    logps, _ = lm_head_logps(model, hidden, torch.tensor([0, 1, 2, 3, 4]), chunk=2)
    model.head.weight.data.untyped_storage().resize_(0)  # what FSDP2's reshard does to the unsharded parameter
    with pytest.raises(RuntimeError, match="nsp_engine='generic' with FSDP2"):
        logps.sum().backward()

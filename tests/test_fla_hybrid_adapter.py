"""The fla-hybrid state adapter's row logic on plain tensors (no fla kernels): which models it serves, left-padded
concatenation of attention K/V, the shared-prefix branch layout and the masks of continuing calls. The engines'
equivalence on a model: tests/test_fla_families_interpret.py (fla_hybrid.py under the Triton interpreter)."""

import types

import pytest
import torch

from trl_refine.rollout.adapters.fla_hybrid import FlaHybridStateAdapter
from trl_refine.rollout.state import FlaStateAdapter, state_adapter_for, unverified_reason


def _model(model_type="gla", **attn):
    spec = {"layers": [1], "num_heads": 2, "window_size": None, **attn}
    config = types.SimpleNamespace(model_type=model_type, attn=spec)
    return types.SimpleNamespace(config=config)


def test_fla_models_with_attention_layers_get_the_hybrid_adapter():
    for model_type in ("gla", "delta_net", "gated_deltanet", "kda", "hgrn2"):
        adapter, why = state_adapter_for(_model(model_type))
        assert isinstance(adapter, FlaHybridStateAdapter) and why == "" and adapter.share_prefix_kv
    adapter, why = state_adapter_for(_model(window_size=64))
    assert adapter is None and "sliding-window" in why and "64" in why


def _snapshot(rows: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    recurrent = {"recurrent_state": torch.randn(rows, 2, 3, 3, generator=g), "attn_state": None,
                 "conv_state": None, "ffn_state": None}  # fmt: skip
    kv = tuple(torch.randn(rows, length, 4, generator=g) for _ in range(2))
    attention = {"recurrent_state": None, "attn_state": kv, "conv_state": None, "ffn_state": None,
                 "valid": torch.ones(rows, length, dtype=torch.bool)}  # fmt: skip
    return [recurrent, attention]


def test_concat_left_pads_attention_and_branch_rows_share_the_prefix():
    adapter = FlaHybridStateAdapter(_model().config)
    a, b = _snapshot(1, 3, 0), _snapshot(1, 5, 1)
    state = adapter.concat([a, b])
    keys = state[1]["attn_state"][0]
    assert keys.shape == (2, 5, 4)
    assert torch.equal(keys[0, 2:], a[1]["attn_state"][0][0]) and torch.equal(keys[0, :2], torch.zeros(2, 4))
    assert state[1]["valid"].tolist() == [[False, False, True, True, True], [True] * 5]
    assert torch.equal(state[0]["recurrent_state"], torch.cat([a[0]["recurrent_state"], b[0]["recurrent_state"]]))

    rows = adapter.branch_rows(state, torch.tensor([1, 0]), 3)  # prefix 1 then prefix 0, G = 3
    assert rows[0]["recurrent_state"].shape[0] == 6  # copied per branch
    assert torch.equal(rows[0]["recurrent_state"][3], state[0]["recurrent_state"][0])
    prefix_keys, _ = rows[1]["prefix_attn_state"]
    assert prefix_keys.shape == (2, 5, 4) and torch.equal(prefix_keys[0], keys[1])  # once per prefix
    assert rows[1]["attn_state"][0].shape == (6, 0, 4)  # the branches' own K/V, empty
    mask = adapter.continuation_kwargs(rows, 2, 1, "cpu")["attention_mask"]
    assert mask.shape == (6, 5 + 2 + 1)
    assert mask[:3, :5].all() and mask[3:, :2].sum() == 0 and mask[3:, 2:].all()
    for refused in (lambda: adapter.concat([rows]), lambda: adapter.select_rows(rows, torch.tensor([0]))):
        with pytest.raises(ValueError, match="shares its prefix K/V"):
            refused()

    copied = FlaHybridStateAdapter(_model().config, share_prefix_kv=False).branch_rows(state, torch.tensor([1, 0]), 3)
    assert "prefix_attn_state" not in copied[1] and copied[1]["attn_state"][0].shape == (6, 5, 4)
    mask = adapter.continuation_kwargs(copied, 0, 2, "cpu")["attention_mask"]
    assert mask.shape == (6, 7) and mask[3:, :2].sum() == 0
    # one unpadded row (a document's segment call): fla's own no-mask path
    assert adapter.continuation_kwargs(a, 0, 4, "cpu") == {}


def test_surveyed_fla_families_are_classified():
    """docs/models.md's survey of fla's model types, as the engine choice sees it."""

    def model(model_type):
        return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type, attn=None))

    adapter, _ = state_adapter_for(model("gsa"))
    assert type(adapter) is FlaStateAdapter and unverified_reason(model("gsa")) == ""
    # served, gradients compared on CPU (fla_families.py FAMILY naive): auto picks them
    for model_type in ("hgrn", "comba"):
        assert state_adapter_for(model(model_type))[0] is not None
        assert unverified_reason(model(model_type)) == ""
    for model_type, reason in (("retnet", "rotary offset"), ("rwkv6", "token-shift"), ("mamba3", "one token")):
        adapter, why = state_adapter_for(model(model_type))
        assert adapter is None and reason in why
    assert "no state adapter" in state_adapter_for(model("transformer"))[1]

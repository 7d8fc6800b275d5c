"""The fla <-> reference DeltaNet converter (trl_refine.models.delta_net.convert), on CPU without fla: weights and
config survive a round trip through an fla-format checkpoint. (That the two models compute the same function is
tests/gpu/test_gpu_parity.py::test_reference_delta_net_matches_fla.)"""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file

from trl_refine.models.delta_net import RefDeltaNetConfig, RefDeltaNetForCausalLM
from trl_refine.models.delta_net.convert import (
    load_fla_checkpoint,
    main,
    reference_from_fla,
    save_fla_checkpoint,
)

TINY = dict(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64, eos_token_id=1)
IGNORED = ("_name_or_path", "model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "auto_map")


def tiny(seed=0, **kw) -> RefDeltaNetForCausalLM:
    torch.manual_seed(seed)
    model = RefDeltaNetForCausalLM(RefDeltaNetConfig(**{**TINY, **kw})).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def fields(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in IGNORED}


def assert_same(a: RefDeltaNetForCausalLM, b: RefDeltaNetForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert fields(a.config) == fields(b.config)
    ids = torch.randint(3, 384, (2, 70))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "use_gate": True, "expand_v": 2.0}])
def test_round_trip_through_fla_checkpoint(tmp_path, overrides):
    ref = tiny(**overrides)
    save_fla_checkpoint(ref, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "delta_net" and raw["architectures"] == ["DeltaNetForCausalLM"]
    stored = load_file(tmp_path / "model.safetensors")
    assert set(stored) <= set(ref.state_dict()) and "model.embeddings.weight" in stored
    assert_same(ref, load_fla_checkpoint(tmp_path))


def test_from_fla_model_object_and_cli(tmp_path):
    ref = tiny(seed=1)
    # an fla model object is read only through .config.to_dict() and .state_dict(): a stand-in with fla's model_type
    cfg = types.SimpleNamespace(to_dict=lambda: {**ref.config.to_dict(), "model_type": "delta_net"})
    fla_like = types.SimpleNamespace(config=cfg, state_dict=ref.state_dict)
    assert_same(ref, reference_from_fla(fla_like))
    ref.save_pretrained(tmp_path / "ref")
    main(["to-fla", str(tmp_path / "ref"), str(tmp_path / "fla")])
    main(["to-reference", str(tmp_path / "fla"), str(tmp_path / "back")])
    assert_same(ref, RefDeltaNetForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval())


def test_rejects_other_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a DeltaNet checkpoint"):
        load_fla_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "delta_net", **TINY}))
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        load_fla_checkpoint(tmp_path)

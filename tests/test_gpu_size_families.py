"""GPU size, run 5's wiring on CPU (seconds): experiments/tiny_base/pretrain.py's model families (LaCT: a few steps
move the weights and save a base that replicate.py loads; fla GatedDeltaNet: refused clearly on CPU without the
Triton interpreter) and replicate.py's gated-kernel switch (``model.gated_kernel``), with no kernel run. The
pipeline under the interpreter, GatedDeltaNet included, is the CPU smoke of docs/replication.md "GPU size, run 5"."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")
sys.path.insert(0, os.path.join(ROOT, "tiny_base"))
sys.path.insert(0, os.path.join(ROOT, "replication"))

import pretrain  # noqa: E402
import replicate  # noqa: E402

TINY = ["--device", "cpu", "--batch", "2", "--steps", "4", "--eval_every", "2", "--warmup", "2", "--val_rep", "2",
        "--val_default", "2", "--val_docs", "2", "--start_length", "150", "--min_length", "150", "--max_length", "200"]  # fmt: skip


def test_lact_family_pretrains_moves_its_weights_and_saves_a_base_replicate_loads(tmp_path):
    """In micro-batches of one row, as the session pretrains LaCT (MICRO_LACT)."""
    out = tmp_path / "tb"
    choice = pretrain.main(["--out", str(out), "--sweep", "smoke_lact", "--micro_batch", "1", *TINY])
    assert choice["chosen"] == "lact_h32l1"
    log = json.loads((out / "base" / "build_log.json").read_text())
    assert log["arguments"]["family"] == "auto" and [c["step"] for c in log["curve"]] == [2, 4]
    assert log["parity_with_trained_model"] is None  # no conversion: the model itself is saved
    base = replicate.load_model(str(out / "base"), "cpu")
    assert type(base).__name__ == "LaCTForCausalLM" and base.config.window_size == base.config.lact_chunk_size == 64
    torch.manual_seed(0)  # the sweep's initialisation (--seed 0)
    hidden, layers, heads, inter, _, _, extra = pretrain.SWEEPS["smoke_lact"]["lact_h32l1"]
    fresh = pretrain.new_family_model(
        "lact", pretrain.family_fields("lact", hidden, layers, heads, inter, extra), "cpu"
    )
    trained = base.state_dict()
    assert fresh.state_dict().keys() == trained.keys()
    moved = [k for k, v in fresh.state_dict().items() if not torch.equal(v, trained[k])]
    assert len(moved) > len(trained) // 2, f"only {moved} moved"
    cfg = {"model": {"kind": "lact_swiglu"}, "pretrain": {"checkpoint": str(out / "base")}}
    assert replicate.model_type(cfg, str(tmp_path / "rep")) == "lact_swiglu"


def test_family_sizes_of_the_gpu_sweeps():
    """The pre-registered bases: ~110M each (counted on the meta device)."""
    counts = {}
    for sweep, name in (("gpu100m_gated", "gdn_h1024l8"), ("gpu100m_lact", "lact_h1024l8")):
        family = pretrain.SWEEP_FAMILY[sweep]
        hidden, layers, heads, inter, lr, _, extra = pretrain.SWEEPS[sweep][name]
        with torch.device("meta"):
            model = pretrain.new_family_model(
                family, pretrain.family_fields(family, hidden, layers, heads, inter, extra), "meta"
            )
        counts[name] = sum(p.numel() for p in model.parameters())
        assert lr == 1e-3
    assert counts == {"gdn_h1024l8": 112_183_424, "lact_h1024l8": 110_054_560}


def test_bad_family_options_fail_early(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        pretrain.main(["--out", str(tmp_path / "g"), "--sweep", "smoke_gated", *TINY])
    with pytest.raises(SystemExit, match="pick a lact sweep"):
        pretrain.main(["--out", str(tmp_path / "x"), "--sweep", "smoke", "--family", "lact", *TINY])
    with pytest.raises(SystemExit, match="has one implementation"):
        pretrain.main(["--out", str(tmp_path / "x"), "--sweep", "smoke_lact", "--impl", "reference", *TINY])
    assert not (tmp_path / "g").exists() and not (tmp_path / "x").exists()


def _gated_base(path) -> None:
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    torch.manual_seed(0)
    fields = pretrain.family_fields("gated_deltanet", 32, 1, 2, 64, {"expand_v": 1})
    GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**fields)).save_pretrained(path)


def test_replicate_runs_a_gated_deltanet_base_through_the_gated_kernel(tmp_path, monkeypatch):
    """The whole process inside use_trl_refine_gated_kernel by default (CUDA named, nothing run), fla's own with
    ``gated_kernel: fla``; a saved fla GatedDeltaNet loads; ``trl_refine`` on another model is refused."""
    pytest.importorskip("fla")
    patch = importlib.import_module("trl_refine.kernels.fla_gated_patch")
    layer_module = importlib.import_module(patch.FLA_LAYER_MODULE)
    base = tmp_path / "base"
    _gated_base(base)
    loaded = replicate.load_model(str(base), "cpu")
    assert loaded.config.model_type == "gated_deltanet"
    with open(os.path.join(ROOT, "replication", "configs", "gpu_size_gated_deltanet.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["model"]["gated_kernel"] == "trl_refine" and cfg["midtrain"]["lr"] == 1e-4
    cfg["pretrain"]["checkpoint"] = str(base)
    tok = replicate.tokenizer()
    fla_op = getattr(layer_module, patch.FLA_OP_NAME)
    for choice in ("trl_refine", None):
        cfg["model"]["gated_kernel"] = choice
        with replicate.gated_kernel(cfg, str(tmp_path / "rep"), "cuda", tok):
            assert getattr(layer_module, patch.FLA_OP_NAME) is patch.chunk_gated_delta_rule
        assert getattr(layer_module, patch.FLA_OP_NAME) is fla_op
    from trl_refine.kernels.fla_gated_choice import fla_refuses_gated_backward

    refuses = fla_refuses_gated_backward("cuda")[0]  # False without a CUDA GPU
    for choice, swapped in (("fla", False), ("auto", refuses)):
        cfg["model"]["gated_kernel"] = choice
        with replicate.gated_kernel(cfg, str(tmp_path / "rep"), "cuda", tok):
            op = getattr(layer_module, patch.FLA_OP_NAME)
            assert op is (patch.chunk_gated_delta_rule if swapped else fla_op), choice
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        replicate.gated_kernel(cfg, str(tmp_path / "rep"), "cpu", tok)
    cfg = {"model": {"kind": "refine_delta_net", "gated_kernel": "trl_refine"}, "pretrain": {}}
    with pytest.raises(SystemExit, match="needs an fla GatedDeltaNet"):
        replicate.gated_kernel(cfg, str(tmp_path / "rep2"), "cuda", tok)
    cfg["model"]["gated_kernel"] = "tilelang"
    with pytest.raises(SystemExit, match="choose one of fla, trl_refine, auto"):
        replicate.gated_kernel(cfg, str(tmp_path / "rep2"), "cuda", tok)


def test_the_pre_registered_configs_share_run_3s_protocol():
    folder = os.path.join(ROOT, "replication", "configs")
    load = lambda name: yaml.safe_load(open(os.path.join(folder, name)))  # noqa: E731, SIM115
    delta = load("gpu_size_delta_net.yaml")
    for name, kind in (("gpu_size_gated_deltanet.yaml", "fla_gated_deltanet"), ("gpu_size_lact.yaml", "lact_swiglu")):
        cfg = load(name)
        assert cfg["model"]["kind"] == kind and cfg["seeds"] == [0, 1, 2, 3, 4]
        for key in ("device", "data", "eval", "pretrain", "midtrain", "posttrain", "testtime"):
            assert cfg[key] == delta[key], (name, key)


def test_micro_batches_give_the_whole_batch_gradient():
    from contextlib import nullcontext

    torch.manual_seed(0)
    model = pretrain.new_model(pretrain.model_fields(32, 1, 1, 64), "cpu", "reference")
    ids, kind = pretrain.Batches(0, 5, lambda b: (150, 200)).make(3)
    loss, _, _ = pretrain.weighted_loss(model(input_ids=ids).logits, ids, kind, 4.0)
    loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sliced, _, _ = pretrain.accumulated_backward(model, ids, kind, 4.0, nullcontext, 2)
    assert torch.allclose(sliced, loss.detach(), rtol=1e-5) and not sliced.requires_grad
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, whole[n], rtol=1e-4, atol=1e-7), n

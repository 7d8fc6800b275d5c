"""``nsp_coef = 0``: an NTP-only run runs no scan, selection, rollouts or rewards, and trains the plain NTP loss."""

import math

import pytest
import torch
from conftest import documents, small_config, tiny_delta_net
from datasets import Dataset

from trl_refine import NSPGRPOTrainer
from trl_refine.losses import masked_token_nll
from trl_refine.modeling_utils import score_tokens
from trl_refine.rollout.base import DocumentBatch


def counting(engine):
    """Count every call of the engine's entry points (the scan and the rollouts, or the fused scan's two)."""
    calls = {"scan": 0, "generate": 0, "fused_scan": 0, "generate_fused": 0, "forward_train": 0}
    for name in calls:
        original = getattr(engine, name)

        def wrapped(*a, _name=name, _original=original, **kw):
            calls[_name] += 1
            return _original(*a, **kw)

        setattr(engine, name, wrapped)
    return calls


def trainer(tmp_path, tokenizer, nsp_coef, **kw):
    ds = Dataset.from_dict({"text": documents(4)})
    args = small_config(tmp_path / str(nsp_coef), nsp_coef=nsp_coef, documents_per_device=2, **kw)
    return NSPGRPOTrainer(tiny_delta_net(), args=args, train_dataset=ds, processing_class=tokenizer)


def test_ntp_only_makes_no_engine_call_and_logs_the_same_keys(tmp_path, byte_tokenizer):
    refine = trainer(tmp_path, byte_tokenizer, 0.2)
    refine_calls = counting(refine.engine)
    refine.train()
    assert refine_calls["generate_fused"] > 0  # the counter sees a ReFINE run's rollouts (the fused scan's)

    ntp = trainer(tmp_path, byte_tokenizer, 0.0)
    ntp_calls = counting(ntp.engine)
    before = {n: p.detach().clone() for n, p in ntp.model.named_parameters()}
    ntp.train()
    assert not any(ntp_calls.values())
    assert any(not torch.equal(before[n], p) for n, p in ntp.model.named_parameters())  # it trained

    def keys(tr):
        return {k for row in tr.state.log_history if "loss" in row for k in row}

    assert keys(ntp) == keys(refine)
    last = [row for row in ntp.state.log_history if "ntp_loss" in row][-1]
    assert math.isfinite(last["ntp_loss"])
    assert all(
        last[k] is None for k in ("nsp/policy_loss", "reward", "nsp/exact_match", "entropy", "clip_ratio/low_mean")
    )
    assert ntp.state.num_input_tokens_seen > 0


def test_ntp_only_loss_is_the_plain_ntp_loss(tmp_path, byte_tokenizer):
    tr = trainer(tmp_path, byte_tokenizer, 0.0, ntp_coef=0.7)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    rows = [tr.train_dataset[0]] * 4 + [tr.train_dataset[1]] * 4  # two documents of different lengths (padding)
    inputs = tr._prepare_inputs(rows)
    loss = tr.compute_loss(tr.model, inputs)

    nll, count = 0.0, 0
    for row in (tr.train_dataset[0], tr.train_dataset[1]):
        ids = torch.tensor([row["input_ids"]])
        doc = DocumentBatch(ids, torch.ones_like(ids))
        logps, _, _ = score_tokens(tr.model, doc.input_ids, doc.attention_mask, doc.label_mask())
        s, c = masked_token_nll(logps, doc.label_mask())
        nll, count = nll + s, count + c
    assert inputs["doc_input_ids"].size(0) == 2 and (inputs["doc_attention_mask"] == 0).any()
    assert loss.item() == pytest.approx(0.7 * (nll / count).item(), rel=1e-6)
    loss.backward()  # the loss has gradients
    assert all(p.grad is not None for p in tr.model.parameters() if p.requires_grad)


def test_ntp_only_with_pad_targets_is_the_padded_batch_loss_and_logs_no_policy_term(tmp_path, byte_tokenizer):
    """``nsp_coef = 0`` with ``ntp_count_pad_targets``: the release's padded-batch NTP loss, still no engine call;
    the policy loss and TRL's policy metrics of the micro-step are logged as missing (NaN), not as 0."""
    from trl_refine.step import padded_ntp_terms

    tr = trainer(tmp_path, byte_tokenizer, 0.0, ntp_coef=0.5, ntp_count_pad_targets=True)
    calls = counting(tr.engine)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 2
    inputs = tr._prepare_inputs([tr.train_dataset[0]] * 4 + [tr.train_dataset[1]] * 4)
    loss = tr.compute_loss(tr.model, inputs)
    docs = DocumentBatch(inputs["doc_input_ids"], inputs["doc_attention_mask"])
    with torch.no_grad():
        nll, count = padded_ntp_terms(tr.model, docs)
    assert (docs.attention_mask == 0).any() and not any(calls.values())
    assert loss.item() == pytest.approx(0.5 * (nll / count).item() / 2, rel=1e-6)
    metrics = tr._metrics["train"]
    assert metrics["ntp_loss"][-1] == pytest.approx((nll / count).item(), rel=1e-6)
    assert math.isnan(metrics["nsp/policy_loss"][-1]) and math.isnan(metrics["clip_ratio/low_mean"][-1])

"""NSPGRPOTrainer on CPU: the combined loss by hand, gradients through the prefix, end to end with save/resume."""

import pytest
import torch
import torch.nn.functional as F
from conftest import documents, small_config, tiny_llama
from datasets import Dataset

from trl_refine import NSPGRPOTrainer
from trl_refine.rollout.base import DocumentBatch, RolloutPlan
from trl_refine.rollout.generic import prefix_rows


def make_trainer(tmp_path, tok, model=None, **overrides):
    ds = Dataset.from_dict({"text": documents(8)})
    args = small_config(tmp_path, **overrides)
    trainer = NSPGRPOTrainer(model or tiny_llama(), args=args, train_dataset=ds, processing_class=tok)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by train() otherwise
    return trainer


def generation_rows(trainer, num_docs):
    per_doc = trainer.args.nsp_num_chunks * trainer.args.nsp_num_rollouts
    return [trainer.train_dataset[i] for i in range(num_docs) for _ in range(per_doc)]


def hand_logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits.float()


def test_combined_loss_matches_hand_computation(tmp_path, byte_tokenizer):
    tr = make_trainer(tmp_path, byte_tokenizer, documents_per_device=2, nsp_coef=0.7, ntp_coef=1.3)
    model = tr.model
    model.train()
    inputs = tr._prepare_inputs(generation_rows(tr, 2))
    # move the policy away from the sampling policy so that ratios and clipping matter
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loss = tr.compute_loss(model, inputs)

    docs = DocumentBatch(inputs["doc_input_ids"], inputs["doc_attention_mask"])
    logits = hand_logits(model, docs.input_ids, docs.attention_mask)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, docs.input_ids[:, 1:, None]).squeeze(-1)
    lm = docs.label_mask()[:, :-1]
    ce = -(logp * lm).sum() / lm.sum()

    plan = RolloutPlan(inputs["positions"], 1, 5)
    prefix, pmask = prefix_rows(docs, plan, byte_tokenizer.pad_token_id)
    comp = inputs["completion_ids"]
    full = torch.cat([prefix, comp], 1)
    fmask = torch.cat([pmask, torch.ones_like(comp)], 1)
    w = prefix.size(1)
    rl = torch.log_softmax(hand_logits(model, full, fmask)[:, w - 1 : w + 4], -1).gather(-1, comp[..., None])[..., 0]
    ratio = torch.exp(rl - inputs["old_per_token_logps"])
    adv = inputs["advantages"][:, None]
    clipped = torch.clamp(ratio, 0.8, 1.2)
    ppo = -torch.min(torch.clamp(ratio, max=3.0) * adv, clipped * adv).mean()
    assert not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)  # the test exercises real ratios
    expected = 1.3 * ce + 0.7 * ppo
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


def test_policy_gradient_reaches_parameters_through_the_prefix(tmp_path, byte_tokenizer):
    tr = make_trainer(tmp_path, byte_tokenizer, ntp_coef=0.0, nsp_coef=1.0, nsp_reward="exact")
    model = tr.model
    model.train()
    inputs = tr._prepare_inputs(generation_rows(tr, 1))
    inputs["advantages"] = torch.linspace(-1, 1, inputs["advantages"].numel())  # a non-zero signal
    docs = DocumentBatch(inputs["doc_input_ids"], inputs["doc_attention_mask"])
    plan = RolloutPlan(inputs["positions"], 1, 5)

    model.zero_grad()
    tr.compute_loss(model, inputs).backward()
    full = [p.grad.clone() for p in model.parameters()]

    # same loss with the prefix detached: prefix through the KV cache without gradients, rollout with gradients
    prefix, pmask = prefix_rows(docs, plan, byte_tokenizer.pad_token_id)
    comp = inputs["completion_ids"]
    with torch.no_grad():
        cache = model(input_ids=prefix, attention_mask=pmask, use_cache=True).past_key_values
        first_logits = model(input_ids=prefix, attention_mask=pmask).logits[:, -1:]
    model.zero_grad()
    out = model(
        input_ids=comp[:, :-1],
        attention_mask=torch.cat([pmask, torch.ones_like(comp)], 1)[:, :-1],
        past_key_values=cache,
    )
    logits = torch.cat([first_logits, out.logits], 1)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, comp[..., None])[..., 0]
    ratio = torch.exp(lp - lp.detach())
    (-(ratio * inputs["advantages"][:, None]).mean()).backward()
    detached = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    flat_full = torch.cat([g.flatten() for g in full])
    flat_det = torch.cat([g.flatten() for g in detached])
    assert flat_full.norm() > 0
    rel = (flat_full - flat_det).norm() / flat_full.norm()
    assert rel > 0.05, f"prefix contributes only {rel:.3g} of the policy gradient"
    # embedding rows of tokens that occur only in prefixes get gradient only through the prefix
    emb = model.get_input_embeddings().weight
    idx = list(model.parameters()).index(emb)
    prefix_only = set(prefix[pmask.bool()].tolist()) - set(comp.flatten().tolist())
    assert prefix_only
    rows = torch.tensor(sorted(prefix_only))
    assert full[idx][rows].abs().sum() > 0
    assert detached[idx][rows].abs().sum() == 0


def test_few_steps_change_weights_log_metrics_save_and_resume(tmp_path, byte_tokenizer):
    common = dict(max_steps=3, save_strategy="steps", save_steps=2, seed=7, nsp_reward="hybrid", log_completions=False)
    tr = make_trainer(tmp_path / "a", byte_tokenizer, **common)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 3
    for key in (
        "ntp_loss",
        "nsp/policy_loss",
        "rewards/cosine/mean",
        "rewards/cosine/std",
        "rewards/exact_match/mean",
        "rewards/exact_match/std",
        "reward",
        "reward_std",
        "nsp/exact_match",
        "nsp/entropy_selected",
        "nsp/entropy_document",
        "entropy",
        "clip_ratio/region_mean",
    ):
        assert key in logs[0], key
    assert logs[0]["nsp/exact_match"] == pytest.approx(logs[0]["rewards/exact_match/mean"], abs=1e-6)
    assert len(tr._logs["prompt"]) > 0 and len(tr._logs["extra"]["ground_truth"]) == len(tr._logs["completion"])

    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert reloaded.config.model_type == tr.model.config.model_type

    # resume from step 2 in a fresh trainer: the third step reproduces the uninterrupted run
    tr2 = make_trainer(tmp_path / "a", byte_tokenizer, model=tiny_llama(seed=123), **common)
    tr2.train(resume_from_checkpoint=str(ckpt))
    assert tr2.state.global_step == 3
    last = [h for h in tr2.state.log_history if "loss" in h][-1]
    assert last["step"] == 3
    assert last["loss"] == pytest.approx(logs[-1]["loss"], rel=1e-5)
    assert last["reward"] == pytest.approx(logs[-1]["reward"], rel=1e-5)


def test_prefix_grouping_with_several_rollouts(tmp_path, byte_tokenizer):
    tr = make_trainer(
        tmp_path, byte_tokenizer, nsp_num_chunks=2, nsp_num_rollouts=4, nsp_group_by="prefix", nsp_reward="exact"
    )
    tr.model.train()
    inputs = tr._prepare_inputs(generation_rows(tr, 1))
    assert inputs["completion_ids"].shape == (8, 5)
    adv = inputs["advantages"].view(2, 4)
    assert torch.allclose(adv.sum(-1), torch.zeros(2), atol=1e-5)  # zero-mean within each prefix group
    # every rollout of one prefix starts at the same position
    assert inputs["positions"].shape == (1, 2)


def test_gradient_accumulation_splits_whole_documents(tmp_path, byte_tokenizer):
    tr = make_trainer(tmp_path, byte_tokenizer, gradient_accumulation_steps=2, documents_per_device=1)
    tr.model.train()
    first = tr._prepare_inputs(generation_rows(tr, 2))
    assert first["doc_input_ids"].size(0) == 1 and first["completion_ids"].size(0) == 4
    tr._step += 1
    second = tr._prepare_inputs([])  # served from the buffer, no new generation
    assert second["doc_input_ids"].size(0) == 1
    assert not torch.equal(first["positions"], second["positions"]) or not torch.equal(
        first["doc_input_ids"], second["doc_input_ids"]
    )


def test_ntp_term_matches_cross_entropy(tmp_path, byte_tokenizer):
    tr = make_trainer(tmp_path, byte_tokenizer, ntp_coef=1.0, nsp_coef=0.0001)
    tr.model.train()
    inputs = tr._prepare_inputs(generation_rows(tr, 1))
    tr.compute_loss(tr.model, inputs)
    ids = inputs["doc_input_ids"]
    ce = F.cross_entropy(hand_logits(tr.model, ids, inputs["doc_attention_mask"])[0, :-1], ids[0, 1:])
    assert tr._metrics["train"]["ntp_loss"][-1] == pytest.approx(ce.item(), rel=1e-4)


@pytest.mark.parametrize("engine", ["generic", "snapshot"])
def test_peft_lora_trains_adapters_only(tmp_path, byte_tokenizer, engine):
    from conftest import tiny_delta_net
    from peft import LoraConfig

    model = tiny_delta_net(seed=2)
    base_q = model.model.layers[0].attn.q_proj.weight.detach().clone()
    ds = Dataset.from_dict({"text": documents(2)})
    args = small_config(tmp_path, max_steps=1, nsp_engine=engine, learning_rate=1e-2)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    tr = NSPGRPOTrainer(model, args=args, train_dataset=ds, processing_class=byte_tokenizer, peft_config=peft_config)
    lora_before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_B" in n}
    tr.train()
    lora_after = dict(tr.model.named_parameters())
    assert any(not torch.equal(v, lora_after[n]) for n, v in lora_before.items())
    assert torch.equal(tr.model.get_base_model().model.layers[0].attn.q_proj.base_layer.weight, base_q)


def test_micro_steps_of_one_optimizer_step_draw_different_rollout_noise(tmp_path, byte_tokenizer):
    """With steps_per_generation 1 and gradient accumulation, every micro-step generates: each must draw its own
    numbers (seeded by optimizer step and micro-step), and the same ones again when a run is resumed there."""
    tr = make_trainer(
        tmp_path, byte_tokenizer, documents_per_device=1, gradient_accumulation_steps=2, steps_per_generation=1
    )
    tr.model.train()

    def draw(micro_step):
        tr._step = micro_step
        return torch.rand(4, generator=tr._rollout_generator("train", stream=1))

    assert not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(0), draw(2))  # same optimizer step (global_step), same micro index
    tr.state.global_step = 1
    next_step = draw(0)
    tr.state.global_step = 0
    assert not torch.equal(next_step, draw(0))

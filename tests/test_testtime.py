"""Test-time ReFINE: the PPO-clip loss by hand, bit-exact restore (full FT and LoRA), no leakage between examples,
the official keep-adapting mode, and the evaluator hook."""

import pytest
import torch
import torch.nn.functional as F
from conftest import documents, tiny_delta_net, tiny_llama

import trl_refine
from trl_refine import NSPGRPOConfig, TestTimeConfig, TestTimeRefine
from trl_refine.eval import evaluate, generate_answers
from trl_refine.losses import ppo_clip_loss

ttr = trl_refine.test_time_refine  # (a module attribute: pytest would collect a bare `test_*` name)

FAST = dict(nsp_num_chunks=4, nsp_margin=8, learning_rate=1e-2, max_new_tokens=6)


def prompts(num=3):
    return [d + " Answer:" for d in documents(num, base=1)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------------
# the loss


def test_ppo_clip_loss_matches_the_official_formula():
    logps = torch.log(torch.tensor([[0.5, 1.5, 4.0], [0.5, 1.1, 4.0]], dtype=torch.float64)).requires_grad_()
    old = torch.zeros(2, 3, dtype=torch.float64)  # ratios 0.5, 1.5 | 1.1, 4.0
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    loss, stats = ppo_clip_loss(logps, old, adv, mask)
    # A = +1: max(-r, -clip(r)) = -min(r, clip(r)) -> -0.5, -1.2, -1.2
    # A = -2: min(max(2r, 2clip(r)), 2·3) -> 2·0.8, 2·1.1, (masked)
    expected = (-0.5 - 1.2 - 1.2 + 1.6 + 2.2) / 5
    assert loss.item() == pytest.approx(expected)
    assert stats["clip_fraction"].item() == pytest.approx(3 / 5)  # 1.5, 4.0 (A > 0) and 0.5 (A < 0) are clipped
    loss.backward()
    grad = logps.grad
    assert grad[0, 1] == 0 and grad[0, 2] == 0 and grad[1, 0] == 0 and grad[1, 2] == 0  # clipped or masked
    assert grad[0, 0] == pytest.approx(-0.5 / 5) and grad[1, 1] == pytest.approx(2 * 1.1 / 5)
    # dual clip: a huge ratio with a negative advantage costs at most c·|A|
    big, _ = ppo_clip_loss(torch.tensor([[5.0]]), torch.zeros(1, 1), torch.tensor([-1.0]))
    assert big.item() == pytest.approx(3.0)
    off, _ = ppo_clip_loss(torch.tensor([[5.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), dual_clip=None)
    assert off.item() == pytest.approx(torch.e**5)


@pytest.mark.parametrize("nsp_coef", [0.4, 0.0], ids=["refine", "ntp-only"])
def test_first_step_ntp_loss_is_the_prompt_cross_entropy(byte_tokenizer, nsp_coef):
    model = tiny_llama()
    text = prompts(1)
    ids = byte_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ce = F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:]).item()
    adapter = TestTimeRefine(nsp_num_chunks=4, nsp_margin=8, learning_rate=1e-2, nsp_coef=nsp_coef)
    with adapter(model, byte_tokenizer, text) as stats:
        pass
    assert stats["steps"][0]["ntp_loss"] == pytest.approx(ce, rel=1e-5)
    assert stats["steps"][0]["grad_norm"] > 0
    # the NTP-only baseline rolls nothing out
    assert (stats["steps"][0]["policy_loss"] != stats["steps"][0]["policy_loss"]) == (nsp_coef == 0)


# ---------------------------------------------------------------------------------------------------------------------
# restore and leakage


@pytest.mark.parametrize("make", [tiny_delta_net, tiny_llama], ids=["delta_net", "llama"])
def test_full_finetuning_is_restored_bit_exactly(byte_tokenizer, make):
    model = make()
    model.train()
    before = snapshot(model)
    adapter = TestTimeRefine(steps=2, **{k: v for k, v in FAST.items() if k != "max_new_tokens"})
    with adapter(model, byte_tokenizer, prompts(1)):
        assert not same(model, before)  # it did adapt
    assert same(model, before)
    assert model.training  # train/eval flag restored
    assert "forward" not in vars(model)  # the fused LM head patch is gone again


def test_lora_is_restored_bit_exactly_and_base_weights_never_move(byte_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = snapshot(model)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    answers, adapter = ttr(model, byte_tokenizer, prompts(2), steps=2, return_adapter=True, **FAST)
    assert len(answers) == 2 and len(adapter.history) == 2
    assert same(model, before)
    # with restore off, only the adapters move
    ttr(model, byte_tokenizer, prompts(1), steps=2, restore=False, **FAST)
    after = dict(model.named_parameters())
    changed = {k for k, v in before.items() if k in after and not torch.equal(v, after[k])}
    assert changed and all("lora_" in k for k in changed) and not (changed & frozen)


def test_no_leakage_between_examples(byte_tokenizer):
    model = tiny_delta_net()
    a, b = prompts(2)
    both, ad_both = ttr(model, byte_tokenizer, [a, b], steps=2, return_adapter=True, **FAST)
    alone, ad_alone = ttr(model, byte_tokenizer, [b], steps=2, return_adapter=True, **FAST)
    assert both[1] == alone[0]
    assert ad_both.history[1]["steps"] == ad_alone.history[0]["steps"]  # identical adaptation of b, loss by loss
    # keep adapting (official): b is adapted from the weights a left behind
    state = snapshot(model)
    kept, ad_kept = ttr(model, byte_tokenizer, [a, b], steps=2, restore=False, return_adapter=True, **FAST)
    assert not same(model, state)
    assert ad_kept.history[1]["steps"][0]["ntp_loss"] != ad_alone.history[0]["steps"][0]["ntp_loss"]
    assert ad_kept.history[0]["steps"] == ad_both.history[0]["steps"]  # the first example is unaffected


def test_zero_learning_rate_gives_the_plain_greedy_answers(byte_tokenizer):
    model = tiny_llama()
    texts = prompts(2)
    plain = generate_answers(model, byte_tokenizer, texts, max_new_tokens=6, batch_size=1, show_progress=False)
    adapted = ttr(model, byte_tokenizer, texts, steps=1, **{**FAST, "learning_rate": 0.0})
    assert adapted == plain


def test_evaluator_hook_and_batches(byte_tokenizer):
    model = tiny_llama()
    before = snapshot(model)
    ds = {"prompt": prompts(3), "answer": [["the"], ["fox"], ["dog"]]}
    adapter = TestTimeRefine(mini_batch_size=1, **{k: v for k, v in FAST.items() if k != "max_new_tokens"})
    result = evaluate(
        model, byte_tokenizer, ds, "ruler_qa", adapt=adapter, batch_size=2, max_new_tokens=4, show_progress=False
    )
    assert result["adapted"] and result["num_examples"] == 3
    assert [len(h["steps"]) for h in adapter.history] == [2, 1]  # batches of 2 and 1 prompts, one step per prompt
    assert same(model, before)


def test_config_sources_and_bad_input(byte_tokenizer):
    cfg = TestTimeConfig()
    assert (cfg.nsp_reward, cfg.nsp_coef, cfg.ntp_coef, cfg.nsp_rollout_length, cfg.nsp_num_chunks) == (
        "exact",
        0.4,
        1.0,
        5,
        8,
    )
    assert (cfg.learning_rate, cfg.reset, cfg.epsilon, cfg.dual_clip) == (1e-6, "batch", 0.2, 3.0)
    nsp = NSPGRPOConfig(output_dir="x", use_cpu=True, bf16=False, nsp_num_chunks=3, nsp_coef=0.4, nsp_reward="exact")
    from_nsp = TestTimeConfig.from_any(nsp, steps=3)
    assert (from_nsp.nsp_num_chunks, from_nsp.steps, from_nsp.dual_clip) == (3, 3, 3.0)
    with pytest.raises(TypeError, match="unknown test-time options"):
        TestTimeRefine(stepz=2)
    with pytest.raises(ValueError, match="reset"):
        TestTimeConfig(reset="sometimes")
    model = tiny_llama()
    with pytest.raises(ValueError, match="fewer than"):
        TestTimeRefine(short_prompts="error").adapt(model, byte_tokenizer, ["too short"])
    stats = TestTimeRefine().adapt(model, byte_tokenizer, ["too short"])  # default: skipped, nothing trained
    assert stats["skipped"] == 1 and stats["steps"] == []


@pytest.mark.parametrize("engine", ["snapshot", "onepass"])
def test_reusing_the_sampling_pass_adapts_exactly_the_same(byte_tokenizer, engine):
    """One prompt per step with the snapshot engine (and the one-pass engine, `auto`'s pick here): the sampling pass
    serves the loss too (n+1 segment calls, or 1 document pass, fewer per step) and the adapted weights and step
    statistics are those of two separate passes (the one-pass engine's scan fused into that pass, `nsp_fuse_scan`)."""
    text = prompts(1)
    results = []
    for reuse in (True, False):
        model = tiny_delta_net(seed=2)
        calls = []
        model.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        adapter = TestTimeRefine(
            steps=2,
            nsp_engine=engine,
            nsp_reuse_sampling_pass=reuse,
            **{k: v for k, v in FAST.items() if k != "max_new_tokens"},
        )
        adapter.config.reset = "never"  # keep the adapted weights to compare them
        with adapter(model, byte_tokenizer, text) as stats:
            pass
        results.append((snapshot(model), stats["steps"], len(calls)))
    (w1, s1, c1), (w2, s2, c2) = results
    assert not same(tiny_delta_net(seed=2), w1)  # the weights did adapt (and were kept)
    # two steps; the one-pass engine also folds its scan into the reused pass (nsp_fuse_scan): 2 forwards fewer
    assert c2 - c1 == 2 * (FAST["nsp_num_chunks"] + 1 if engine == "snapshot" else 2)
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=1e-7, rtol=0), key
    for a, b in zip(s1, s2):
        assert a["policy_loss"] == pytest.approx(b["policy_loss"], rel=1e-6, abs=1e-9)
        assert a["ntp_loss"] == pytest.approx(b["ntp_loss"], rel=1e-6)


def test_summary_averages_each_step_index_over_batches_and_skips_nans(byte_tokenizer):
    model = tiny_delta_net()
    _, adapter = ttr(model, byte_tokenizer, prompts(2), steps=2, return_adapter=True, **FAST)
    summary = adapter.summary()
    assert summary["batches"] == 2 and summary["optimizer_steps"] == 4 and summary["skipped_prompts"] == 0
    assert len(summary["per_step"]) == 2
    for i, step in enumerate(summary["per_step"]):
        expected = sum(batch["steps"][i]["ntp_loss"] for batch in adapter.history) / 2
        assert step["ntp_loss"] == pytest.approx(expected)
    # the second step sees weights the first moved: a different loss (lr 1e-2 on a random model)
    assert summary["per_step"][0]["ntp_loss"] != summary["per_step"][1]["ntp_loss"]
    # NTP-only adaptation has no reward: the mean leaves the NaNs out and stays NaN, it does not become 0
    _, ntp_only = ttr(model, byte_tokenizer, prompts(1), steps=1, nsp_coef=0.0, return_adapter=True, **FAST)
    step = ntp_only.summary()["per_step"][0]
    assert step["reward"] != step["reward"] and step["ntp_loss"] > 0

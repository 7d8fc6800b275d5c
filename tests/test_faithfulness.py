"""Defaults that follow the official release (docs/faithfulness.md), each with its option, and the ReFINE step
shared by the trainer and test-time training."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import documents, small_config, tiny_delta_net
from datasets import Dataset

from trl_refine import NSPGRPOTrainer
from trl_refine.config import NSPGRPOConfig
from trl_refine.data import tokenize_documents
from trl_refine.modeling_utils import ensure_fused_lm_head
from trl_refine.rollout.base import DocumentBatch, RolloutPlan
from trl_refine.rollout.generic import GenericEngine
from trl_refine.rollout.snapshot import SnapshotEngine
from trl_refine.selection import select_positions, smooth_entropy
from trl_refine.testtime import TestTimeConfig, TestTimeRefine

ROOT = Path(__file__).resolve().parents[1]
EOS = 1  # ByT5's </s>


def eos_loving_delta_net():
    """A reference DeltaNet whose next-token distribution puts almost all mass on EOS at every position."""
    model = tiny_delta_net()
    with torch.no_grad():
        model.model.embeddings.weight[:, 0] += 50.0  # residual dim 0 large and positive everywhere
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0  # the final hidden state is (≈ sqrt(D), 0, ..., 0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS, 0] = 10.0  # EOS logit ≈ 56, every other logit 0
    ensure_fused_lm_head(model)
    return model.eval()


def one_doc(length=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (1, length), generator=g)
    return DocumentBatch(ids, torch.ones_like(ids))


@pytest.mark.parametrize("engine", [GenericEngine(pad_token_id=0), SnapshotEngine(pad_token_id=0)], ids=str)
def test_rollouts_never_sample_eos_and_keep_unmasked_old_logps(engine):
    model, docs = eos_loving_delta_net(), one_doc()
    plan = RolloutPlan(torch.tensor([[40, 70]]), 2, 5, masked_token_ids=(EOS,))
    with torch.no_grad():
        out = engine.generate(model, docs, plan, torch.Generator().manual_seed(0))
    assert not (out.completion_ids == EOS).any()
    # old log-probs come from the unmasked distribution, where EOS holds almost all mass
    assert (out.old_logps < -20).all()
    allow = RolloutPlan(plan.positions, 2, 5)  # nsp_sample_eos=True: nothing masked
    with torch.no_grad():
        out = engine.generate(model, docs, allow, torch.Generator().manual_seed(0))
    assert (out.completion_ids == EOS).all()


def test_trainer_and_testtime_mask_eos_by_default(tmp_path, byte_tokenizer):
    ds = Dataset.from_dict({"text": documents(2)})
    tr = NSPGRPOTrainer(
        tiny_delta_net(), args=small_config(tmp_path), train_dataset=ds, processing_class=byte_tokenizer
    )
    assert tr.masked_rollout_tokens == (EOS,)
    args = small_config(tmp_path, nsp_sample_eos=True)
    tr = NSPGRPOTrainer(tiny_delta_net(), args=args, train_dataset=ds, processing_class=byte_tokenizer)
    assert tr.masked_rollout_tokens == ()

    seen = []

    class Recording(GenericEngine):
        def generate(self, model, docs, plan, *a, **kw):
            out = super().generate(model, docs, plan, *a, **kw)
            seen.append((plan.masked_token_ids, out.completion_ids))
            return out

    hook = TestTimeRefine(engine=Recording(pad_token_id=0), nsp_num_chunks=2, nsp_margin=8, learning_rate=0.0)
    hook.adapt(eos_loving_delta_net(), byte_tokenizer, [documents(1)[0]])
    assert seen[0][0] == (EOS,) and not (seen[0][1] == EOS).any()


def test_group_by_auto_follows_the_release():
    base = dict(output_dir="/tmp/nsp-faithful", use_cpu=True, report_to="none")
    assert NSPGRPOConfig(**base).group_by == "document"
    c = NSPGRPOConfig(**base, nsp_num_rollouts=4)
    assert c.nsp_group_by == "auto" and c.group_by == "prefix" and c.group_size == 4
    assert NSPGRPOConfig(**base, nsp_num_rollouts=4, nsp_group_by="document").group_size == 32
    assert TestTimeConfig().group_by == "document" and TestTimeConfig(nsp_num_rollouts=2).group_size == 2


@pytest.mark.parametrize("strategy", ["argmax", "argmin"])
def test_argmax_argmin_read_the_raw_entropy(strategy):
    # one chunk; a lone spike (raw max) next to a broad plateau (smoothed max), and a lone dip vs a broad valley
    entropy = torch.full((1, 100), 5.0)
    if strategy == "argmax":
        entropy[0, 30] = 9.0  # raw argmax
        entropy[0, 60:66] = 8.0  # smoothed argmax
    else:
        entropy[0, 30] = 0.5  # raw argmin
        entropy[0, 60:66] = 1.0  # smoothed argmin
    mask = torch.ones(1, 100, dtype=torch.long)
    smoothed = smooth_entropy(entropy, 5)
    assert int(getattr(smoothed[0], strategy)()) != 30  # the test tells raw from smoothed apart
    pos = select_positions(entropy, mask, num_chunks=1, rollout_length=5, margin=5, strategy=strategy)
    assert pos.item() == 30


def test_min_length_filter_and_no_special_tokens(byte_tokenizer):
    ds = Dataset.from_dict({"text": ["a" * 50, "b" * 300, "c" * 200]})
    out = tokenize_documents(
        ds, byte_tokenizer, column="text", max_length=None, min_length=10, keep_min_length=200, name="t"
    )
    assert sorted(len(x) for x in out["input_ids"]) == [200, 300]  # raw bytes: no EOS appended
    with_special = tokenize_documents(
        ds, byte_tokenizer, column="text", max_length=None, min_length=10, add_special_tokens=True, name="t"
    )
    assert all(ids[-1] == EOS for ids in with_special["input_ids"])
    with pytest.raises(ValueError, match="nsp_min_length"):
        tokenize_documents(ds, byte_tokenizer, column="text", max_length=None, min_length=10, keep_min_length=999)


def test_trainer_documents_have_no_special_tokens_by_default(tmp_path, byte_tokenizer):
    ds = Dataset.from_dict({"text": documents(3)})
    tr = NSPGRPOTrainer(
        tiny_delta_net(), args=small_config(tmp_path), train_dataset=ds, processing_class=byte_tokenizer
    )
    assert all(ids[-1] != EOS for ids in tr.train_dataset["input_ids"])
    assert len(tr.train_dataset[0]["input_ids"]) == len(documents(3)[0].encode())
    args = small_config(tmp_path, nsp_min_length=len(documents(3)[2].encode()))
    tr = NSPGRPOTrainer(tiny_delta_net(), args=args, train_dataset=ds, processing_class=byte_tokenizer)
    assert len(tr.train_dataset) == sum(len(d.encode()) >= args.nsp_min_length for d in documents(3))


def test_posttrain_answer_target_has_no_eos_by_default(tmp_path, byte_tokenizer):
    from trl_refine.posttrain import PostTrainConfig, encode_prompt_answer

    args = small_config(tmp_path, PostTrainConfig)
    _, answer = encode_prompt_answer("Question: where?", "Paris", byte_tokenizer, args)
    assert answer[-1] != EOS and len(answer) == len("Paris")
    args = small_config(tmp_path, PostTrainConfig, answer_append_eos=True)
    assert encode_prompt_answer("Question: where?", "Paris", byte_tokenizer, args)[1][-1] == EOS


def test_posttrain_answer_is_tokenized_alone_and_prompts_cut_like_the_release(tmp_path, byte_tokenizer):
    """Release (`rl_dataset.py` TTTRLHFDataset): the first gold answer tokenized on its own, right after the prompt's
    tokens; prompts cut to their first max_prompt_length = max_length - max_answer_length tokens."""
    from trl_refine.posttrain import PostTrainConfig, encode_prompt_answer

    args = small_config(tmp_path, PostTrainConfig)
    assert args.answer_tokenization == "alone" and args.long_examples == "error"
    prompt, answer = "Question: where? Answer:", "Paris"
    p, a = encode_prompt_answer(prompt, answer, byte_tokenizer, args)
    assert a == byte_tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert byte_tokenizer.decode(p + a) == prompt + answer  # no separator
    joint = small_config(tmp_path, PostTrainConfig, answer_tokenization="joint")
    assert byte_tokenizer.decode(encode_prompt_answer(prompt, answer, byte_tokenizer, joint)[1]) == " Paris"

    cut = small_config(tmp_path, PostTrainConfig, max_length=20, max_answer_length=4, long_examples="truncate_end")
    long_prompt = "x" * 30 + " Question: where? Answer:"
    p, a, was_cut = encode_prompt_answer(long_prompt, answer, byte_tokenizer, cut, return_truncated=True)
    assert was_cut and len(p) == 16 and byte_tokenizer.decode(p) == long_prompt[:16] and len(a) == 4
    with pytest.raises(ValueError, match="answer_tokenization"):
        small_config(tmp_path, PostTrainConfig, answer_tokenization="separate")


def test_paper_setting_configs_follow_the_release():
    for name in ("midtrain_delta_net_1.3B", "midtrain_lact_760M"):
        cfg = yaml.safe_load((ROOT / "recipes" / "configs" / f"{name}.yaml").read_text())
        assert cfg["nsp_min_length"] == 16384 and cfg["nsp_max_length"] == 16384
    for name in ("posttrain_delta_net_1.3B", "posttrain_lact_760M"):
        assert (
            yaml.safe_load((ROOT / "recipes" / "configs" / f"{name}.yaml").read_text())["eval_decoding"] == "release"
        )
    for name in ("testtime_delta_net_1.3B", "testtime_lact_760M"):
        assert yaml.safe_load((ROOT / "recipes" / "configs" / f"{name}.yaml").read_text())["decoding"] == "release"


def test_release_decoding_samples_reproducibly_and_greedy_stays_default(byte_tokenizer):
    from trl_refine.eval import generate_answers

    model = tiny_delta_net().eval()
    prompts = ["the quick brown fox jumps over", "seven wizards quietly judge"]
    kw = dict(max_new_tokens=12, batch_size=2, show_progress=False)
    greedy = generate_answers(model, byte_tokenizer, prompts, **kw)
    assert generate_answers(model, byte_tokenizer, prompts, decoding="greedy", **kw) == greedy
    for use_generate in (True, False):
        a = generate_answers(
            model, byte_tokenizer, prompts, decoding="release", seed=3, use_generate=use_generate, **kw
        )
        b = generate_answers(
            model, byte_tokenizer, prompts, decoding="release", seed=3, use_generate=use_generate, **kw
        )
        c = generate_answers(
            model, byte_tokenizer, prompts, decoding="release", seed=4, use_generate=use_generate, **kw
        )
        assert a == b and a != greedy and a != c
    with pytest.raises(ValueError, match="decoding='beam'"):
        generate_answers(model, byte_tokenizer, prompts, decoding="beam", **kw)


def test_posttrain_release_cadence_several_inner_steps_per_sft_step(tmp_path, byte_tokenizer):
    from trl_refine.posttrain import NSPPostTrainer, PostTrainConfig

    ds = Dataset.from_dict(
        {"prompt": [d + " Question: which word?" for d in documents(4)], "answer": ["fox", "dog", "the", "lazy"]}
    )
    args = small_config(tmp_path, PostTrainConfig, max_steps=4, posttrain_inner_steps=2, max_length=None)
    tr = NSPPostTrainer(tiny_delta_net(), args=args, train_dataset=ds, processing_class=byte_tokenizer)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert tr.inner_optimizer_steps == 4 and tr.answer_sft_steps == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, tr.model.parameters()))
    with pytest.raises(ValueError, match="posttrain_inner_steps"):
        small_config(tmp_path, PostTrainConfig, posttrain_inner_steps=0)


def test_trainer_and_test_time_take_the_same_step(tmp_path, byte_tokenizer, monkeypatch):
    """Same document, weights and seed: the trainer and test-time ReFINE select the same positions, sample the same
    rollouts, compute the same rewards and the same loss terms."""
    import trl_refine.testtime as testtime

    text = documents(1)[0]
    common = dict(nsp_num_chunks=4, nsp_margin=8, nsp_reward="exact", nsp_coef=0.4, ntp_coef=1.0, seed=5)
    args = small_config(tmp_path, documents_per_device=1, **common)
    tr = NSPGRPOTrainer(
        tiny_delta_net(), args=args, train_dataset=Dataset.from_dict({"text": [text]}), processing_class=byte_tokenizer
    )
    monkeypatch.setattr(type(tr), "_rollout_seed", lambda self, mode: 1234)
    monkeypatch.setattr(testtime, "_stable_seed", lambda seed, texts, step: 1234)
    captured = {}

    def recording(name, engine):
        for method in ("generate", "generate_fused"):  # the latter: the one-pass engine's fused scan (the trainer)
            original = getattr(engine, method)

            def generate(model, docs, plan, *a, _original=original, **kw):
                out = _original(model, docs, plan, *a, **kw)
                captured[name] = (plan.positions.clone(), out.completion_ids.clone(), out.old_logps.clone())
                return out

            setattr(engine, method, generate)
        return engine

    recording("trainer", tr.engine)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    inputs = tr._prepare_inputs([tr.train_dataset[0]] * 4)
    tr.compute_loss(tr.model, inputs)
    metrics = tr._metrics["train"]

    hook = TestTimeRefine(engine=recording("testtime", SnapshotEngine(pad_token_id=0)), learning_rate=0.0, **common)
    stats = hook.adapt(tiny_delta_net(), byte_tokenizer, [text])["steps"][0]

    (tp, tc, tl), (sp, sc, sl) = captured["trainer"], captured["testtime"]
    assert torch.equal(tp, sp) and torch.equal(tc, sc)
    torch.testing.assert_close(tl, sl)
    assert stats["reward"] == pytest.approx(metrics["reward"][-1], abs=1e-6)
    assert stats["ntp_loss"] == pytest.approx(metrics["ntp_loss"][-1], rel=1e-5)
    assert stats["policy_loss"] == pytest.approx(metrics["nsp/policy_loss"][-1], abs=1e-6)


def test_testtime_samples_once_per_batch_like_the_release(byte_tokenizer):
    """Release: one rollout round for the batch, then one optimizer step per mini-batch (the later ones off-policy:
    their rollouts and old log-probs come from the weights before the first step). ``rollouts_per="mini_batch"``
    samples each mini-batch with the current weights."""
    prompts = documents(2)

    class Recording(SnapshotEngine):
        def __init__(self):
            super().__init__(pad_token_id=0)
            self.sampled, self.trained = [], []

        def generate(self, model, docs, plan, *a, **kw):
            out = super().generate(model, docs, plan, *a, **kw)
            self.sampled.append(out.completion_ids.clone())
            return out

        def forward_train(self, model, docs, plan, completion_ids, *a, **kw):
            self.trained.append(completion_ids.clone())
            return super().forward_train(model, docs, plan, completion_ids, *a, **kw)

    common = dict(nsp_num_chunks=2, nsp_margin=8, learning_rate=1e-2, mini_batch_size=1)
    assert TestTimeConfig().rollouts_per == "batch"
    release = Recording()
    stats = TestTimeRefine(engine=release, **common).adapt(tiny_delta_net(), byte_tokenizer, prompts)
    assert len(stats["steps"]) == 2 and len(release.sampled) == 1 and release.sampled[0].size(0) == 2 * 2
    # the second prompt trains, after the first step, on the rollouts sampled before it
    assert torch.equal(release.trained[1], release.sampled[0][2:])

    on_policy = Recording()
    TestTimeRefine(engine=on_policy, rollouts_per="mini_batch", **common).adapt(
        tiny_delta_net(), byte_tokenizer, prompts
    )
    assert [s.size(0) for s in on_policy.sampled] == [2, 2]
    assert [torch.equal(t, s) for t, s in zip(on_policy.trained, on_policy.sampled)] == [True, True]
    with pytest.raises(ValueError, match="rollouts_per"):
        TestTimeConfig(rollouts_per="prompt")


def test_count_pad_targets_is_the_release_ntp_loss(tmp_path, byte_tokenizer):
    """``ntp_count_pad_targets``: the NTP term over every position of the left-padded batch, pads as inputs and
    targets (fla's DeltaNet loss with labels = input_ids in the release); the default counts real next tokens only."""
    from trl_refine.losses import masked_token_nll
    from trl_refine.modeling_utils import score_tokens
    from trl_refine.step import padded_ntp_terms

    texts = documents(2)  # two lengths: the shorter one is padded
    ds = Dataset.from_dict({"text": texts})

    def ntp_loss(**kw):
        args = small_config(tmp_path, documents_per_device=2, nsp_engine="generic", **kw)
        tr = NSPGRPOTrainer(tiny_delta_net(), args=args, train_dataset=ds, processing_class=byte_tokenizer)
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
        inputs = tr._prepare_inputs([tr.train_dataset[0]] * 4 + [tr.train_dataset[1]] * 4)
        tr.compute_loss(tr.model, inputs)
        docs = DocumentBatch(inputs["doc_input_ids"], inputs["doc_attention_mask"])
        return tr._metrics["train"]["ntp_loss"][-1], docs, tr.model

    assert not small_config(tmp_path).ntp_count_pad_targets
    counted, docs, model = ntp_loss(ntp_count_pad_targets=True)
    assert (docs.attention_mask == 0).any()
    scored = torch.ones_like(docs.attention_mask, dtype=torch.bool)
    scored[:, -1] = False
    with torch.no_grad():
        logps, _, _ = score_tokens(model, docs.input_ids, docs.attention_mask, scored)
        nll, count = masked_token_nll(logps, scored)
    assert count == docs.input_ids.numel() - docs.batch_size
    assert counted == pytest.approx((nll / count).item(), rel=1e-5)
    real, _, _ = ntp_loss()
    assert abs(real - counted) > 1e-3
    with torch.no_grad():  # without padding both count the same positions (the paper's mid-training setting)
        one = DocumentBatch(docs.input_ids[1:], docs.attention_mask[1:])
        assert (one.attention_mask == 1).all()
        s, c = padded_ntp_terms(model, one)
        logps, _, _ = score_tokens(model, one.input_ids, one.attention_mask, one.label_mask())
        s2, c2 = masked_token_nll(logps, one.label_mask())
    assert c == c2 and s.item() == pytest.approx(s2.item(), rel=1e-6)

    # test time: one mini-batch of both prompts, NTP only, no update
    stats = TestTimeRefine(ntp_count_pad_targets=True, nsp_coef=0.0, learning_rate=0.0, nsp_margin=8).adapt(
        model, byte_tokenizer, texts
    )
    assert stats["steps"][0]["ntp_loss"] == pytest.approx((nll / count).item(), rel=1e-5)

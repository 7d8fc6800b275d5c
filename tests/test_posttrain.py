"""NSPPostTrainer: optimizer steps per mode, the exact losses of each step, and early, clear errors on bad data."""

import copy

import pytest
import torch
from conftest import documents, small_config, tiny_delta_net, tiny_llama
from datasets import Dataset

from trl_refine import NSPGRPOTrainer, NSPPostTrainer, PostTrainConfig
from trl_refine.posttrain import collate_prompt_answer, encode_prompt_answer, prepare_posttrain_dataset


def qa_dataset(num=4, base=1, answer_list=False):
    docs = documents(num, base)
    prompts = [d + "\nQuestion: which word comes first? Answer:" for d in docs]
    answers = [d.split()[0] for d in docs]
    if answer_list:
        answers = [[a, a.upper()] for a in answers]
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def post_config(tmp_path, **overrides):
    return small_config(tmp_path, config_class=PostTrainConfig, **{"max_length": 1024, **overrides})


def make_trainer(tmp_path, tok, model=None, dataset=None, optimizer=None, **overrides):
    args = post_config(tmp_path, **overrides)
    return NSPPostTrainer(
        model or tiny_llama(),
        args=args,
        train_dataset=dataset if dataset is not None else qa_dataset(),
        processing_class=tok,
        optimizers=(optimizer, None),
    )


class StepRecorder:
    """Counts real optimizer steps and keeps the parameters before and after each one."""

    def __init__(self, optimizer):
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.before, self.after = [], []
        optimizer.register_step_pre_hook(lambda *a: self.before.append([p.detach().clone() for p in self.params]))
        optimizer.register_step_post_hook(lambda *a: self.after.append([p.detach().clone() for p in self.params]))

    @property
    def steps(self):
        return len(self.after)


def record_micro_batches(trainer):
    batches = []
    original = trainer._prepare_inputs

    def wrapped(generation_batch):
        out = original(generation_batch)
        if trainer.model.training:
            batches.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in out.items()})
        return out

    trainer._prepare_inputs = wrapped
    return batches


@pytest.mark.parametrize(
    ("mode", "per_batch"), [("nested", 2), ("joint", 1), ("nested_sft", 2), ("sft", 1)], ids=lambda x: str(x)
)
def test_optimizer_steps_per_batch(tmp_path, byte_tokenizer, mode, per_batch):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = StepRecorder(opt)
    tr = make_trainer(tmp_path, byte_tokenizer, model=model, optimizer=opt, posttrain_mode=mode)
    tr.train()
    assert tr.state.global_step == 2
    assert rec.steps == per_batch * 2
    assert tr.inner_optimizer_steps == (2 if per_batch == 2 else 0)
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all("sft_loss" in h for h in logs)
    assert all(("ntp_loss" in h) == (mode != "sft") for h in logs)
    assert all(("nsp/policy_loss" in h) == (mode in ("nested", "joint")) for h in logs)
    assert all(("posttrain/inner_grad_norm" in h) == (per_batch == 2) for h in logs)
    for h in logs:  # the logged loss is the sum of the parts
        parts = h["sft_loss"] + (h.get("ntp_loss", 0.0) if mode != "sft" else 0.0)
        if mode in ("nested", "joint"):
            parts += 0.2 * h["nsp/policy_loss"]
        assert h["loss"] == pytest.approx(parts, rel=1e-4, abs=1e-5)


def ce_grad(model, params, ids, mask, score_mask, coef):
    """Gradient of coef · token-mean CE of the positions in score_mask (position t predicts ids[t + 1])."""
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    m = score_mask[:, :-1].float()
    (coef * -(logp * m).sum() / m.sum()).backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def load_params(model, values):
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def label_mask_of(mask):
    m = mask.bool()
    out = torch.zeros_like(m)
    out[:, :-1] = m[:, :-1] & m[:, 1:]
    return out


def train_one_sgd_step(tmp_path, tokenizer, model, lr, **config):
    """One optimizer step of plain SGD (no clipping, no decay) with every parameter update and micro-batch recorded.
    Returns the trainer, an untouched copy of the initial model, the step recorder and the micro-batches."""
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = StepRecorder(opt)
    tr = make_trainer(
        tmp_path, tokenizer, model=model, optimizer=opt, max_steps=1, max_grad_norm=0.0, weight_decay=0.0, **config
    )
    batches = record_micro_batches(tr)
    tr.train()
    return tr, reference, rec, batches


@pytest.mark.parametrize("accumulation", [1, 2])
def test_nested_sft_takes_the_inner_step_then_the_answer_step_on_the_updated_weights(
    tmp_path, byte_tokenizer, accumulation
):
    lr = 0.5
    tr, reference, rec, batches = train_one_sgd_step(
        tmp_path,
        byte_tokenizer,
        tiny_llama(),
        lr,
        posttrain_mode="nested_sft",
        ntp_coef=1.3,
        sft_coef=0.7,
        gradient_accumulation_steps=accumulation,
    )
    assert rec.steps == 2 and len(batches) == accumulation
    theta0, theta1, theta2 = rec.before[0], rec.after[0], rec.after[1]
    assert all(torch.equal(a, b) for a, b in zip(theta1, rec.before[1]))  # nothing in between the two steps
    params = list(reference.parameters())

    load_params(reference, theta0)
    inner = [torch.zeros_like(p) for p in params]
    for b in batches:
        g = ce_grad(
            reference, params, b["doc_input_ids"], b["doc_attention_mask"], label_mask_of(b["doc_attention_mask"]), 1.3
        )
        inner = [x + y / accumulation for x, y in zip(inner, g)]
    load_params(reference, theta1)
    outer = [torch.zeros_like(p) for p in params]
    for b in batches:
        g = ce_grad(reference, params, b["sft_input_ids"], b["sft_attention_mask"], b["sft_label_mask"], 0.7)
        outer = [x + y / accumulation for x, y in zip(outer, g)]

    for a, b, g in zip(theta0, theta1, inner):
        torch.testing.assert_close((a - b) / lr, g, rtol=1e-4, atol=1e-6)
    for a, b, g in zip(theta1, theta2, outer):
        torch.testing.assert_close((a - b) / lr, g, rtol=1e-4, atol=1e-6)


def test_nested_refine_inner_step_is_refine_and_outer_step_is_answer_sft(tmp_path, byte_tokenizer):
    lr = 0.5
    tr, reference, rec, batches = train_one_sgd_step(
        tmp_path, byte_tokenizer, tiny_delta_net(), lr, posttrain_mode="nested", nsp_coef=0.5, sft_coef=0.7
    )
    assert rec.steps == 2 and len(batches) == 1
    (batch,) = batches
    theta0, theta1, theta2 = rec.before[0], rec.after[0], rec.after[1]
    params = list(reference.parameters())

    # inner: exactly NSPGRPOTrainer's ReFINE loss (NTP + PPO-clip) on this micro-batch, at θ0, without the answer
    load_params(reference, theta0)
    reference.zero_grad()
    tr.current_gradient_accumulation_steps = 1
    NSPGRPOTrainer.compute_loss(tr, reference, batch).backward()
    inner = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for a, b, g in zip(theta0, theta1, inner):
        torch.testing.assert_close((a - b) / lr, g, rtol=1e-4, atol=1e-6)
    # outer: the answer CE at θ1
    load_params(reference, theta1)
    outer = ce_grad(
        reference, params, batch["sft_input_ids"], batch["sft_attention_mask"], batch["sft_label_mask"], 0.7
    )
    for a, b, g in zip(theta1, theta2, outer):
        torch.testing.assert_close((a - b) / lr, g, rtol=1e-4, atol=1e-6)


def test_joint_and_sft_losses_are_the_expected_sums(tmp_path, byte_tokenizer):
    for mode in ("joint", "sft"):
        tr = make_trainer(
            tmp_path, byte_tokenizer, posttrain_mode=mode, sft_coef=0.6, nsp_coef=0.5, documents_per_device=2
        )
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
        per_doc = tr.args.nsp_num_chunks * tr.args.nsp_num_rollouts
        rows = [tr.train_dataset[i] for i in range(2) for _ in range(per_doc)]
        inputs = tr._prepare_inputs(rows)
        loss = tr.compute_loss(tr.model, inputs)
        logits = tr.model(input_ids=inputs["sft_input_ids"], attention_mask=inputs["sft_attention_mask"]).logits
        ids = inputs["sft_input_ids"]
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        m = inputs["sft_label_mask"][:, :-1].float()
        expected = 0.6 * -(logp * m).sum() / m.sum()
        if mode == "joint":
            expected = expected + NSPGRPOTrainer.compute_loss(tr, tr.model, inputs)
            assert "completion_ids" in inputs
        else:
            assert "completion_ids" not in inputs and "doc_input_ids" not in inputs  # no rollouts, no NTP
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_accumulation_nested_runs_the_answer_step_once_per_window(tmp_path, byte_tokenizer):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = StepRecorder(opt)
    tr = make_trainer(
        tmp_path, byte_tokenizer, model=model, optimizer=opt, posttrain_mode="nested", gradient_accumulation_steps=2
    )
    calls = []
    original = tr.answer_loss
    tr.answer_loss = lambda m, b: calls.append(tr.state.global_step) or original(m, b)
    tr.train()
    assert tr.state.global_step == 2 and rec.steps == 4 and tr.inner_optimizer_steps == 2
    assert calls == [0, 0, 1, 1]  # both micro-batches of a window, after its inner step, before its outer step


# ---------------------------------------------------------------------------------------------------------------------
# data


def test_answer_tokens_follow_the_prompt(byte_tokenizer, tmp_path):
    args = post_config(tmp_path, max_answer_length=4, answer_tokenization="joint")
    p, a = encode_prompt_answer("Q? Answer:", "Paris", byte_tokenizer, args)
    assert byte_tokenizer.decode(p) == "Q? Answer:"
    assert byte_tokenizer.decode(a) == " Par"  # separator, then cut to 4 tokens (no room for EOS)
    p, a = encode_prompt_answer("Q? Answer: ", "Rome", byte_tokenizer, post_config(tmp_path))
    assert byte_tokenizer.decode(a) == "Rome"  # no EOS by default (official)
    p, a = encode_prompt_answer("Q? Answer: ", "Rome", byte_tokenizer, post_config(tmp_path, answer_append_eos=True))
    assert a[-1] == byte_tokenizer.eos_token_id and byte_tokenizer.decode(a[:-1]) == "Rome"
    batch = collate_prompt_answer([[5, 6, 7], [8]], [[9, 10], [11]], pad_token_id=0)
    assert batch["sft_input_ids"].tolist() == [[5, 6, 7, 9, 10], [0, 0, 0, 8, 11]]
    # position t is scored on token t + 1: exactly the answer tokens are targets
    targets = batch["sft_input_ids"][:, 1:][batch["sft_label_mask"][:, :-1]]
    assert targets.tolist() == [9, 10, 11]


def test_first_gold_answer_of_a_list_is_the_target(byte_tokenizer, tmp_path):
    ds = prepare_posttrain_dataset(qa_dataset(answer_list=True), byte_tokenizer, post_config(tmp_path))
    first = qa_dataset()["answer"][0]
    assert byte_tokenizer.decode(ds[0]["answer_ids"], skip_special_tokens=True) == first  # tokenized alone
    assert "prompt" not in ds.column_names and "input_ids" in ds.column_names


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (Dataset.from_dict({"text": ["a"], "answer": ["b"]}), "missing column"),
        (Dataset.from_dict({"prompt": ["a"], "answers": [["b"]]}), "answer_column='answers'"),
        (Dataset.from_dict({"prompt": [], "answer": []}), "empty"),
        (Dataset.from_dict({"prompt": ["a long enough prompt " * 5], "answer": [""]}), "empty"),
        (Dataset.from_dict({"prompt": ["a long enough prompt " * 5], "answer": [[]]}), "empty list"),
    ],
    ids=["no-prompt", "answers-column", "empty-dataset", "empty-answer", "no-gold"],
)
def test_bad_data_fails_at_construction(tmp_path, byte_tokenizer, dataset, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, byte_tokenizer, dataset=dataset)


def test_prompt_plus_answer_longer_than_max_length(tmp_path, byte_tokenizer):
    ds = qa_dataset()
    longest = max(len(p) for p in ds["prompt"])
    with pytest.raises(ValueError, match="do not fit max_length"):
        make_trainer(tmp_path, byte_tokenizer, dataset=ds, max_length=longest + 2)  # answer needs more room
    tr = make_trainer(tmp_path, byte_tokenizer, dataset=ds, max_length=longest + 2, long_examples="drop")
    assert 0 < len(tr.train_dataset) < len(ds)
    args = post_config(tmp_path, max_length=100, long_examples="truncate")
    cut = prepare_posttrain_dataset(ds, byte_tokenizer, args)
    assert len(cut) == len(ds) and all(cut["prompt_truncated"])
    assert all(len(p) + len(a) == 100 for p, a in zip(cut["input_ids"], cut["answer_ids"]))
    assert byte_tokenizer.decode(cut[0]["input_ids"]).endswith("Answer:")  # the question survives


def test_short_prompts_need_room_for_refine_but_not_for_sft(tmp_path, byte_tokenizer):
    ds = Dataset.from_dict({"prompt": ["short prompt, Answer:"] * 2, "answer": ["x"] * 2})
    with pytest.raises(ValueError, match="fewer than"):
        make_trainer(tmp_path, byte_tokenizer, dataset=ds, posttrain_mode="nested")
    tr = make_trainer(tmp_path, byte_tokenizer, dataset=ds, posttrain_mode="sft")
    assert len(tr.train_dataset) == 2


def test_config_validation():
    with pytest.raises(ValueError, match="posttrain_mode"):
        PostTrainConfig(output_dir="x", use_cpu=True, bf16=False, posttrain_mode="nestled")
    with pytest.raises(ValueError, match="nsp_max_length"):
        PostTrainConfig(output_dir="x", use_cpu=True, bf16=False, nsp_max_length=4096)
    with pytest.raises(TypeError, match="PostTrainConfig"):
        NSPPostTrainer(tiny_llama(), args=object(), train_dataset=qa_dataset())
    cfg = PostTrainConfig(output_dir="x", use_cpu=True, bf16=False)
    assert (cfg.posttrain_mode, cfg.nsp_reward, cfg.max_answer_length, cfg.max_length) == (
        "nested",
        "hybrid",
        32,
        8192,
    )
    assert (cfg.ntp_coef, cfg.nsp_coef, cfg.learning_rate) == (1.0, 0.2, 1e-6)

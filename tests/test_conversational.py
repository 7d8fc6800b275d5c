"""TRL's conversational format: `messages` for mid-training, conversational `prompt` / `completion` for
post-training and evaluation, rendered with the tokenizer's chat template; clear errors for what we cannot take."""

import pytest
import torch
from conftest import documents, small_config, tiny_llama
from datasets import Dataset
from transformers import ByT5Tokenizer

from trl_refine import NSPGRPOTrainer, PostTrainConfig
from trl_refine.eval import evaluate
from trl_refine.posttrain import prepare_posttrain_dataset

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def chat_tokenizer():
    tok = ByT5Tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def chat(user, assistant=None):
    out = [{"role": "user", "content": user}]
    return out + ([{"role": "assistant", "content": assistant}] if assistant is not None else [])


def test_midtraining_takes_messages(tmp_path, chat_tokenizer):
    docs = documents(4)
    conversations = [chat(d, "ok") for d in docs]
    trainer = NSPGRPOTrainer(
        tiny_llama(),
        args=small_config(tmp_path, max_steps=1),
        train_dataset=Dataset.from_dict({"messages": conversations}),
        processing_class=chat_tokenizer,
    )
    for row, conv in zip(trainer.train_dataset, conversations):
        text = chat_tokenizer.apply_chat_template(conv, tokenize=False)
        assert text.startswith("<user>") and "<assistant>" in text
        assert row["input_ids"] == chat_tokenizer(text, add_special_tokens=False)["input_ids"]  # as the release
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


def test_posttraining_takes_prompt_completion_messages(tmp_path, chat_tokenizer):
    docs = documents(3)
    answers = [d.split()[0] for d in docs]
    args = small_config(tmp_path, config_class=PostTrainConfig, max_length=4096)
    chat_ds = Dataset.from_dict(
        {
            "prompt": [chat(d + "\nWhich word comes first?") for d in docs],
            "completion": [[{"role": "assistant", "content": a}] for a in answers],
        }
    )
    plain_ds = Dataset.from_dict(
        {
            "prompt": [f"<user>{d}\nWhich word comes first?\n<assistant>" for d in docs],
            "answer": answers,
        }
    )
    got = prepare_posttrain_dataset(chat_ds, chat_tokenizer, args)
    want = prepare_posttrain_dataset(plain_ds, chat_tokenizer, args)
    assert got["input_ids"] == want["input_ids"] and got["answer_ids"] == want["answer_ids"]


def test_evaluation_takes_conversational_prompts(chat_tokenizer):
    model = tiny_llama(vocab=len(chat_tokenizer)).eval()
    docs = [d[:80] for d in documents(3)]
    rows = [{"prompt": chat(d), "answer": d.split()[0]} for d in docs]
    plain = [{"prompt": f"<user>{d}\n<assistant>", "answer": d.split()[0]} for d in docs]
    kw = dict(max_new_tokens=4, show_progress=False, keep_predictions=True)
    got = evaluate(model, chat_tokenizer, rows, "ruler_qa", **kw)
    want = evaluate(model, chat_tokenizer, plain, "ruler_qa", **kw)
    assert [e["prediction"] for e in got["examples"]] == [e["prediction"] for e in want["examples"]]
    assert got["score"] == want["score"]


def test_formats_we_cannot_take_fail_with_the_fix(tmp_path, byte_tokenizer, chat_tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        NSPGRPOTrainer(
            tiny_llama(),
            args=small_config(tmp_path),
            train_dataset=Dataset.from_dict({"messages": [chat("a b c")]}),
            processing_class=byte_tokenizer,
        )
    with pytest.raises(ValueError, match="preference data"):
        NSPGRPOTrainer(
            tiny_llama(),
            args=small_config(tmp_path),
            train_dataset=Dataset.from_dict({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]}),
            processing_class=chat_tokenizer,
        )
    with pytest.raises(ValueError, match="preference data"):
        evaluate(tiny_llama(), chat_tokenizer, [{"prompt": "p", "chosen": "a", "rejected": "b"}], "ruler_qa")

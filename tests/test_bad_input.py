"""Bad input fails before training starts, with a message that names the fix."""

import pytest
import torch
from conftest import documents, small_config, tiny_llama
from datasets import Dataset

from trl_refine import NSPGRPOTrainer


def test_documents_too_short(tmp_path, byte_tokenizer):
    ds = Dataset.from_dict({"text": documents(4) + ["too short"]})
    with pytest.raises(ValueError, match="fewer than .* tokens.*nsp_short_documents='drop'"):
        NSPGRPOTrainer(tiny_llama(), args=small_config(tmp_path), train_dataset=ds, processing_class=byte_tokenizer)
    tr = NSPGRPOTrainer(
        tiny_llama(),
        args=small_config(tmp_path, nsp_short_documents="drop"),
        train_dataset=ds,
        processing_class=byte_tokenizer,
    )
    assert len(tr.train_dataset) == 4


def test_missing_column(tmp_path, byte_tokenizer):
    ds = Dataset.from_dict({"body": documents(2)})
    with pytest.raises(ValueError, match="no column 'text'.*document_column"):
        NSPGRPOTrainer(tiny_llama(), args=small_config(tmp_path), train_dataset=ds, processing_class=byte_tokenizer)
    tr = NSPGRPOTrainer(
        tiny_llama(),
        args=small_config(tmp_path, document_column="body"),
        train_dataset=ds,
        processing_class=byte_tokenizer,
    )
    assert "input_ids" in tr.train_dataset.column_names


def test_tokenizer_without_pad_token(tmp_path, byte_tokenizer):
    byte_tokenizer.pad_token = None
    ds = Dataset.from_dict({"text": documents(2)})
    with pytest.raises(ValueError, match="no pad token.*pad_token = tokenizer.eos_token"):
        NSPGRPOTrainer(tiny_llama(), args=small_config(tmp_path), train_dataset=ds, processing_class=byte_tokenizer)


class NoBackboneLM(torch.nn.Module):
    """A causal LM without a separate backbone: it can return logits but no hidden states."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.generation_config = inner.generation_config
        self.warnings_issued = {}

    def forward(self, input_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_model_without_hidden_states_for_cosine_reward(tmp_path, byte_tokenizer):
    from trl_refine.trainer import check_model_hidden_states

    with pytest.raises(ValueError, match="hidden states.*nsp_reward='exact'"):
        check_model_hidden_states(NoBackboneLM(tiny_llama()))
    check_model_hidden_states(tiny_llama())  # a normal model passes


def test_invalid_config_in_trainer(tmp_path, byte_tokenizer):
    ds = Dataset.from_dict({"text": documents(2)})
    with pytest.raises(TypeError, match="NSPGRPOConfig"):
        from trl import GRPOConfig

        NSPGRPOTrainer(
            tiny_llama(), args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False), train_dataset=ds
        )
    with pytest.raises(ValueError, match="train_dataset is required"):
        NSPGRPOTrainer(tiny_llama(), args=small_config(tmp_path), processing_class=byte_tokenizer)
    with pytest.raises(ValueError, match="nsp_engine='snapshot' is not available|cannot run"):
        NSPGRPOTrainer(
            tiny_llama(),
            args=small_config(tmp_path),
            train_dataset=ds,
            processing_class=byte_tokenizer,
            engine="snapshot",
        )


class TrainableNoBackboneLM(NoBackboneLM):
    def add_model_tags(self, tags):
        pass


def test_custom_reward_with_a_model_without_hidden_states_gets_none(tmp_path, byte_tokenizer, caplog):
    import logging

    def custom(prompts, completions, completion_ids, **kw):
        return [0.0] * len(completions)

    def marked(prompts, completions, completion_ids, **kw):
        return [0.0] * len(completions)

    marked.needs_hidden_states = True
    ds = Dataset.from_dict({"text": documents(2)})
    with caplog.at_level(logging.INFO, logger="trl_refine"):
        tr = NSPGRPOTrainer(
            TrainableNoBackboneLM(tiny_llama()),
            reward_funcs=[custom],
            args=small_config(tmp_path, nsp_engine="generic"),
            train_dataset=ds,
            processing_class=byte_tokenizer,
        )
    assert tr._needs_hidden is False and "rollout_hidden_states=None" in caplog.text
    with pytest.raises(ValueError, match="hidden states"):  # a reward that declares it needs them fails early
        NSPGRPOTrainer(
            TrainableNoBackboneLM(tiny_llama()),
            reward_funcs=[marked],
            args=small_config(tmp_path, nsp_engine="generic"),
            train_dataset=ds,
            processing_class=byte_tokenizer,
        )

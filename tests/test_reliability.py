"""Bad input fails at construction with a message that names the fix (issue 15; docs/reliability.md lists them all).

Config ranges and types, bad data (streams, pre-tokenized ids, too few documents), reward-function outputs, resume
checks and test-time training after an exception. Faults during training (NaN, SIGKILL) are in tests/test_faults.py.
"""

from __future__ import annotations

import json
import math

import pytest

from trl_refine import NSPGRPOConfig


def make(**kw):
    return NSPGRPOConfig(output_dir="/tmp/nsp-test", bf16=False, use_cpu=True, report_to="none", **kw)


# ----------------------------------------------------------------------------------------------------------------------
# config ranges and types
@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"documents_per_device": 0}, ValueError, "documents_per_device must be >= 1, got 0"),
        ({"documents_per_device": -2}, ValueError, "documents_per_device must be >= 1"),
        ({"per_device_train_batch_size": 0}, ValueError, "per_device_train_batch_size must be >= 1.*documents_per"),
        ({"per_device_eval_batch_size": 0}, ValueError, "per_device_eval_batch_size must be >= 1"),
        ({"nsp_smoothing_width": 4}, ValueError, "nsp_smoothing_width=4 is even.*Use 5"),
        ({"nsp_generic_rows_per_call": 0}, ValueError, "nsp_generic_rows_per_call must be >= 1"),
        ({"num_iterations": 0}, ValueError, "num_iterations must be >= 1"),
        ({"loss_type": "ppo"}, ValueError, "loss_type='ppo' is not one of grpo, bnpo"),
        ({"scale_rewards": "mean"}, ValueError, "scale_rewards='mean' is not one of group, batch, none"),
        ({"nsp_num_chunks": "8"}, TypeError, "nsp_num_chunks must be an integer, got '8'"),
        ({"nsp_rollout_length": 2.5}, TypeError, "nsp_rollout_length must be an integer"),
        ({"documents_per_device": True}, TypeError, "documents_per_device must be an integer"),
        ({"nsp_coef": "0.2"}, TypeError, "nsp_coef must be a number, got '0.2'"),
        ({"ntp_coef": math.nan}, ValueError, "ntp_coef=nan is not a finite number"),
        ({"nsp_coef": math.inf}, ValueError, "nsp_coef=inf is not a finite number"),
        ({"nsp_selection_temperature": math.inf}, ValueError, "nsp_selection_temperature=inf is not a finite"),
        ({"nsp_selection_temperature": math.nan}, ValueError, "nsp_selection_temperature=nan is not a finite"),
        ({"learning_rate": math.nan}, ValueError, "learning_rate=nan is not a finite number"),
        ({"epsilon": math.nan}, ValueError, "epsilon=nan is not a finite number"),
        ({"delta": math.inf}, ValueError, "delta=inf is not a finite number"),
        ({"nsp_on_divergence": "ignore"}, ValueError, "nsp_on_divergence='ignore' is not one of stop, skip"),
    ],
)
def test_bad_config_values_are_refused_at_construction(overrides, error, message):
    with pytest.raises(error, match=message):
        make(**overrides)


def test_valid_edge_values_still_pass():
    assert make(nsp_smoothing_width=1).smoothing_width == 1
    assert make(nsp_smoothing_width=7).smoothing_width == 7
    assert make(scale_rewards=False).scale_rewards == "none"
    assert make(loss_type="dr_grpo", nsp_generic_rows_per_call=4, num_iterations=2).num_iterations == 2
    assert make(nsp_on_divergence="skip").nsp_on_divergence == "skip"


# ----------------------------------------------------------------------------------------------------------------------
# resume: which checkpoint, and whether the settings still match
def _fake_checkpoint(path, *, state: str | None = "{}", weights: bool = True):
    path.mkdir(parents=True)
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


def test_resume_last_skips_incomplete_checkpoints_and_names_the_one_used(tmp_path, caplog):
    from trl_refine.checkpoints import resolve_resume_checkpoint

    _fake_checkpoint(tmp_path / "checkpoint-2")
    _fake_checkpoint(tmp_path / "checkpoint-10")
    _fake_checkpoint(tmp_path / "checkpoint-12", state='{"global_st')  # killed while writing the trainer state
    _fake_checkpoint(tmp_path / "checkpoint-14", state=None)  # killed after the weights
    with caplog.at_level("WARNING", logger="trl_refine"):
        for value in ("last", True, "true", "latest"):
            assert resolve_resume_checkpoint(value, str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert "skipping the incomplete checkpoint" in caplog.text and "trainer_state.json is truncated" in caplog.text
    assert f"resuming from {tmp_path / 'checkpoint-10'}" in caplog.text
    for value in (None, False, "false", ""):
        assert resolve_resume_checkpoint(value, str(tmp_path)) is None
    with pytest.raises(ValueError, match="checkpoint-14.*no trainer_state.json.*newest complete.*checkpoint-10"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-14"), str(tmp_path))
    with pytest.raises(ValueError, match="no complete checkpoint in output_dir"):
        resolve_resume_checkpoint("last", str(tmp_path / "elsewhere"))
    _fake_checkpoint(tmp_path / "nothing" / "checkpoint-1", weights=False)
    with pytest.raises(ValueError, match=r"no complete checkpoint.*\(1 incomplete ones skipped\)"):
        resolve_resume_checkpoint("last", str(tmp_path / "nothing"))


def test_resume_with_changed_settings_is_refused_or_warned(tmp_path, byte_tokenizer, caplog):
    """A changed documents_per_device used to skip documents silently; now it is refused. A changed k is warned."""
    from conftest import documents, small_config, tiny_llama
    from datasets import Dataset

    from trl_refine import NSPGRPOTrainer

    def trainer(**overrides):
        args = small_config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, nsp_max_length=96, **overrides)
        ds = Dataset.from_dict({"text": documents(4)})
        return NSPGRPOTrainer(tiny_llama(), args=args, train_dataset=ds, processing_class=byte_tokenizer)

    trainer().train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    saved = json.loads((checkpoint / "refine_settings.json").read_text())
    assert saved["documents_per_device"] == 1 and saved["engine"] == "generic" and saved["rewards"] == ["cosine"]
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint-1: documents_per_device: 1 -> 2"):
        trainer(documents_per_device=2).train(resume_from_checkpoint="last")
    with caplog.at_level("WARNING", logger="trl_refine"):
        trainer(nsp_rollout_length=4).train(resume_from_checkpoint="last")
    assert "nsp_rollout_length changed from 5 to 4" in caplog.text


def test_recipe_takes_resume_from_checkpoint_last(tmp_path, caplog):
    """`--resume_from_checkpoint last` resumes from the newest complete checkpoint (`true` used to fail with "Can't
    find a valid checkpoint at true"; both spellings map to the same rule, see the test above)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "midtrain.py"
    spec = importlib.util.spec_from_file_location("recipe_midtrain_resume", path)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["recipe_midtrain_resume"] = recipe
    spec.loader.exec_module(recipe)
    out = tmp_path / "mid"
    argv = ["--output_dir", str(out), "--save_steps", "1", "--synthetic_documents", "4", "--synthetic_chars", "600"]
    argv += ["--disable_tqdm", "true", "--nsp_max_length", "128", "--nsp_num_chunks", "2", "--nsp_margin", "8"]
    argv += ["--tiny_hidden_size", "32", "--tiny_heads", "2"]
    argv += ["--eval_needles", "0", "--baseline_mode", "none"]  # the default's needle check and NTP arm: not needed
    recipe.main([*argv, "--max_steps", "1"])
    with caplog.at_level("WARNING", logger="trl_refine"):
        recipe.main([*argv, "--max_steps", "2", "--resume_from_checkpoint", "last"])
    assert f"resuming from {out / 'checkpoint-1'}" in caplog.text
    assert (out / "checkpoint-2" / "trainer_state.json").exists()


# ----------------------------------------------------------------------------------------------------------------------
# data: streams, pre-tokenized ids, too few documents, evaluation prompts
def _trainer(tmp_path, dataset, tokenizer, **overrides):
    from conftest import small_config, tiny_llama

    from trl_refine import NSPGRPOTrainer

    args = small_config(tmp_path, nsp_max_length=96, **overrides)
    return NSPGRPOTrainer(tiny_llama(), args=args, train_dataset=dataset, processing_class=tokenizer)


def _streams():
    from conftest import documents
    from datasets import Dataset, IterableDataset

    texts = [documents(1)[0], "too short", *documents(3)]

    def rows():
        yield from ({"text": t} for t in texts)

    return {
        "from_generator": IterableDataset.from_generator(rows),  # columns unknown
        "to_iterable_dataset": Dataset.from_dict({"text": texts}).to_iterable_dataset(),
        "mapped": Dataset.from_dict({"text": texts}).to_iterable_dataset().map(lambda r: {"extra": 1}),
    }


@pytest.mark.parametrize("kind", ["from_generator", "to_iterable_dataset", "mapped"])
def test_streaming_datasets_are_tokenized_and_short_documents_dropped(tmp_path, byte_tokenizer, kind, caplog):
    """Streams with unknown columns used to fail with KeyError 'input_ids'; short documents crashed mid-run."""
    trainer = _trainer(tmp_path, _streams()[kind], byte_tokenizer, max_steps=2, nsp_short_documents="drop")
    with caplog.at_level("WARNING", logger="trl_refine"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert "dropping documents of train_dataset shorter than 36 tokens as they stream in (first: row 1)" in caplog.text


def test_streaming_short_document_error_names_the_dataset_row(tmp_path, byte_tokenizer):
    trainer = _trainer(tmp_path, _streams()["from_generator"], byte_tokenizer, max_steps=2)
    with pytest.raises(
        ValueError,
        match="train_dataset row 1 has 9 tokens, fewer than 36.*nsp_short_documents='drop'",  # no EOS (as the release)
    ):
        trainer.train()


@pytest.mark.parametrize(
    "ids, message",
    [
        ([[5] * 60, [5] * 59 + [384]], r"row 1 has id 384, outside the model's vocabulary of 384"),
        ([[5] * 60, [5] * 60, [-3] + [5] * 59], r"row 2 has a negative id \(-3\)"),
        ([[5.0] * 60], r"must hold lists of integer token ids, got arrow type list<item: double>"),
        ([["a"] * 60], r"must hold lists of integer token ids, got arrow type list<item: string>"),
    ],
)
def test_bad_pretokenized_ids_are_refused_at_construction(tmp_path, byte_tokenizer, ids, message):
    """Out-of-vocabulary ids used to fail inside torch's embedding (IndexError: index out of range in self)."""
    from datasets import Dataset

    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, Dataset.from_dict({"input_ids": ids}), byte_tokenizer)


def test_bad_text_rows_and_both_columns(tmp_path, byte_tokenizer, caplog):
    from conftest import documents
    from datasets import Dataset

    texts = documents(3)
    with pytest.raises(ValueError, match=r"train_dataset row 2: 'text' must hold a string .*got NoneType None"):
        _trainer(tmp_path, Dataset.from_dict({"text": [*texts[:2], None]}), byte_tokenizer)
    both = Dataset.from_dict({"text": texts, "input_ids": [[7] * 50] * 3})
    with caplog.at_level("WARNING", logger="trl_refine"):
        trainer = _trainer(tmp_path, both, byte_tokenizer)
    assert "has both 'text' and 'input_ids': the 'text' documents are tokenized" in caplog.text
    assert trainer.train_dataset[0]["input_ids"] != [7] * 50


def test_too_few_documents_for_one_batch_and_documents_left_out_per_epoch(tmp_path, byte_tokenizer, caplog):
    """Fewer documents than one generation batch used to give a 0-step run or a misleading max_steps error."""
    from conftest import documents
    from datasets import Dataset

    with pytest.raises(ValueError, match=r"has 1 usable document\(s\), fewer than one generation batch of 2"):
        _trainer(tmp_path, Dataset.from_dict({"text": documents(1)}), byte_tokenizer, documents_per_device=2)
    with pytest.raises(ValueError, match=r"has 2 usable .* batch of 4 .*steps_per_generation=2"):
        _trainer(
            tmp_path,
            Dataset.from_dict({"text": documents(2)}),
            byte_tokenizer,
            documents_per_device=2,
            gradient_accumulation_steps=2,
        )
    with caplog.at_level("WARNING", logger="trl_refine"):
        _trainer(tmp_path, Dataset.from_dict({"text": documents(5)}), byte_tokenizer, documents_per_device=2)
    assert "1 document(s) are left out of every epoch" in caplog.text


def test_evaluation_refuses_none_prompts():
    from trl_refine.eval.evaluator import as_eval_dataset

    rows = [{"prompt": "a question", "answer": "x"}, {"prompt": None, "answer": "y"}]
    with pytest.raises(ValueError, match=r"1 prompt\(s\) of the dataset are not text \(e.g. row 1: None\)"):
        as_eval_dataset(rows)


# ----------------------------------------------------------------------------------------------------------------------
# reward functions
@pytest.mark.parametrize(
    "output, error, message",
    [
        (None, TypeError, "reward function 'mine' returned None; it must return one float"),
        ("0.5", TypeError, "returned a string"),
        ([0.5, 0.5, 0.5], ValueError, "returned 3 values for 4 rollouts"),
        ([[0.5]] * 4, TypeError, r"returned list \[0.5\] for rollout 0"),
        (["a", 1, 2, 3], TypeError, "returned str 'a' for rollout 0"),
        ("torch2d", ValueError, r"an array of shape \(4, 1\)"),
        (0.5, TypeError, "returned float 0.5"),
    ],
)
def test_reward_outputs_are_checked_with_the_function_name(output, error, message):
    import torch

    from trl_refine.reward_checks import check_reward_output

    if output == "torch2d":
        output = torch.zeros(4, 1)
    with pytest.raises(error, match=message):
        check_reward_output("mine", output, 4)


def test_good_reward_outputs_pass():
    import numpy as np
    import torch

    from trl_refine.reward_checks import check_reward_output

    assert check_reward_output("f", [1, None, 0.5, True], 4) == [1.0, None, 0.5, 1.0]
    assert check_reward_output("f", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]
    assert check_reward_output("f", np.array([1.0, 2.0], dtype=np.float32), 2) == [1.0, 2.0]
    assert check_reward_output("f", [torch.tensor(3.0), np.float64(1.0)], 2) == [3.0, 1.0]


def test_trainer_names_a_bad_reward_function(tmp_path, byte_tokenizer):
    """A reward returning None used to fail with "'NoneType' object is not iterable" inside TRL."""
    from conftest import documents, small_config, tiny_llama
    from datasets import Dataset

    from trl_refine import NSPGRPOTrainer

    def bad_reward(prompts, completions, completion_ids, **kwargs):
        return None

    bad_reward.needs_hidden_states = True  # attributes survive the check's wrapper
    trainer = NSPGRPOTrainer(
        tiny_llama(),
        reward_funcs=[bad_reward],
        args=small_config(tmp_path, max_steps=1, nsp_max_length=96),
        train_dataset=Dataset.from_dict({"text": documents(2)}),
        processing_class=byte_tokenizer,
    )
    assert trainer.reward_func_names == ["bad_reward"] and trainer._needs_hidden
    with pytest.raises(TypeError, match="reward function 'bad_reward' returned None"):
        trainer.train()


def test_all_none_rewards_warn_once_briefly(tmp_path, byte_tokenizer, caplog):
    """TRL's warning printed every keyword argument (hidden states included, ~10 KB) at every step."""
    from conftest import documents, small_config, tiny_llama
    from datasets import Dataset

    from trl_refine import NSPGRPOTrainer

    def unsure(prompts, completions, completion_ids, **kwargs):
        return [None] * len(prompts)

    trainer = NSPGRPOTrainer(
        tiny_llama(),
        reward_funcs=[unsure],
        args=small_config(tmp_path, max_steps=2, nsp_max_length=96),
        train_dataset=Dataset.from_dict({"text": documents(2)}),
        processing_class=byte_tokenizer,
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    ours = [r for r in caplog.records if "no reward function" in r.getMessage()]
    assert len(ours) == 1 and len(ours[0].getMessage()) < 300
    assert "scored 4 of 4 rollouts" in ours[0].getMessage()
    trl = [
        (r.name, r.getMessage()[:80]) for r in caplog.records if "All reward functions returned None" in r.getMessage()
    ]
    assert not trl, trl


def test_trl_all_none_message_is_still_the_one_we_silence():
    """Drift test: the TRL warning `AllNoneRewardWarning` filters out still starts this way."""
    import inspect

    from trl_refine._compat import GRPOTrainer
    from trl_refine.reward_checks import AllNoneRewardWarning

    assert AllNoneRewardWarning.TRL_MESSAGE in inspect.getsource(GRPOTrainer._calculate_rewards)


# ----------------------------------------------------------------------------------------------------------------------
# test-time training
def _adapter(reward_funcs=None, **overrides):
    from trl_refine import TestTimeConfig, TestTimeRefine

    config = TestTimeConfig(nsp_num_chunks=4, nsp_margin=8, learning_rate=1e-2, **overrides)
    return TestTimeRefine(config, reward_funcs=reward_funcs)


def _ttt_prompts(num=2):
    from conftest import documents

    return [d + " Answer:" for d in documents(num, base=1)]


def test_test_time_exception_leaves_no_gradients(byte_tokenizer):
    """An exception between two documents' backward passes used to leave the first one's gradients on the weights."""
    from conftest import tiny_llama

    model = tiny_llama()
    adapter = _adapter()
    make_engine = adapter._get_engine
    calls = []

    def failing_engine(model, pad):
        engine = make_engine(model, pad)
        forward_train = engine.forward_train

        def forward_then_fail(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure in the second document's forward")
            return forward_train(*args, **kwargs)

        engine.forward_train = forward_then_fail
        return engine

    adapter._get_engine = failing_engine
    with pytest.raises(RuntimeError, match="injected failure"), adapter(model, byte_tokenizer, _ttt_prompts(2)):
        pass
    assert len(calls) == 2
    assert all(p.grad is None for p in model.parameters())


def test_test_time_reward_of_the_wrong_length_is_named(byte_tokenizer):
    from conftest import tiny_llama

    def short_reward(prompts, completions, completion_ids, **kwargs):
        return [1.0]

    model = tiny_llama()
    with pytest.raises(ValueError, match=r"reward function 'short_reward' returned 1 values for 4 rollouts"):
        _adapter([short_reward]).adapt(model, byte_tokenizer, _ttt_prompts(1))
    assert all(p.grad is None for p in model.parameters())


def test_tokenizer_ids_outside_the_model_vocabulary(tmp_path, byte_tokenizer):
    from conftest import documents, small_config, tiny_llama
    from datasets import Dataset

    from trl_refine import NSPGRPOTrainer

    with pytest.raises(
        ValueError, match=r"row 0: the tokenizer produced id \d+, outside the model's vocabulary of 100"
    ):
        NSPGRPOTrainer(
            tiny_llama(vocab=100),
            args=small_config(tmp_path, nsp_max_length=96),
            train_dataset=Dataset.from_dict({"text": documents(2)}),
            processing_class=byte_tokenizer,
        )

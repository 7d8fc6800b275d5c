import sys

import pytest

from trl_refine import NSPGRPOConfig


def make(**kw):
    return NSPGRPOConfig(output_dir="/tmp/nsp-test", bf16=False, use_cpu=True, report_to="none", **kw)


def test_defaults_reproduce_official_release():
    c = make()
    assert (c.nsp_num_chunks, c.nsp_rollout_length, c.nsp_num_rollouts, c.nsp_margin) == (8, 5, 1, 20)
    assert (c.nsp_selection, c.nsp_reward, c.nsp_group_by, c.group_by) == ("entropy", "cosine", "auto", "document")
    assert c.nsp_sample_eos is False and c.nsp_add_special_tokens is False and c.nsp_min_length is None
    assert (c.ntp_coef, c.nsp_coef, c.nsp_selection_temperature, c.temperature) == (1.0, 0.2, 1.0, 1.0)
    assert c.smoothing_width == 5 and c.document_column == "text"
    assert c.learning_rate == 1e-6 and c.lr_scheduler_type == "constant" and c.weight_decay == 0.01
    assert c.loss_type == "bnpo" and c.epsilon == 0.2 and c.delta == 3.0 and c.beta == 0.0
    # derived TRL geometry: one document = n·G rows, kept together
    assert c.num_generations == 8 and c.per_device_train_batch_size == 8 and c.max_completion_length == 5
    assert c.group_size == 8 and c.min_document_length == 20 + 40 + 20


def test_derived_batch_geometry():
    c = make(nsp_num_rollouts=4, documents_per_device=3, nsp_group_by="prefix")
    assert c.num_generations == 32 and c.per_device_train_batch_size == 96 and c.group_size == 4
    assert c.smoothing_width == 5
    assert make(nsp_rollout_length=4).smoothing_width == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(nsp_group_by="prefix"), "nsp_num_rollouts >= 2"),
        (dict(nsp_num_chunks=1), "at least 2 rollouts"),
        (dict(per_device_train_batch_size=12), "multiple of n·G"),
        (dict(num_generations=4), "Leave num_generations unset"),
        (dict(temperature=0.7), "temperature"),
        (dict(nsp_selection="random"), "nsp_selection"),
        (dict(nsp_reward="bleu"), "nsp_reward"),
        (dict(nsp_max_length=50), "minimum document length"),
        (dict(ntp_coef=0.0, nsp_coef=0.0), "nothing to train"),
        (dict(max_completion_length=7), "nsp_rollout_length"),
        (dict(documents_per_device=2, per_device_train_batch_size=8), "documents_per_device"),
        (dict(nsp_engine="vllm"), "nsp_engine"),
    ],
)
def test_invalid_combinations_fail_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_yaml_and_cli_through_trl_parser(tmp_path, monkeypatch):
    from trl import TrlParser

    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: /tmp/nsp-yaml\nnsp_num_chunks: 4\nnsp_reward: hybrid\nbf16: false\nuse_cpu: true\n")
    monkeypatch.setattr(
        sys, "argv", ["x", "--config", str(cfg), "--nsp_num_rollouts", "2", "--nsp_group_by", "prefix"]
    )
    (args,) = TrlParser((NSPGRPOConfig,)).parse_args_and_config()
    assert args.nsp_num_chunks == 4 and args.nsp_reward == "hybrid" and args.nsp_num_rollouts == 2
    assert args.num_generations == 8 and args.group_size == 2

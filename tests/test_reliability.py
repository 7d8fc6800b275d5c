"""Bad input fails at construction with a message that names the fix (issue 15; docs/reliability.md lists them all).

Config ranges and types, bad data (streams, pre-tokenized ids, too few documents), reward-function outputs, resume
checks and test-time training after an exception. Faults during training (NaN, SIGKILL) are in tests/test_faults.py.
"""

from __future__ import annotations

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

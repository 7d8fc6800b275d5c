"""The trainer's ZeRO-3 and activation-checkpointing checks read the abilities an engine declares, not its class."""

import pytest
from conftest import documents, small_config, tiny_delta_net
from datasets import Dataset

from trl_refine import NSPGRPOTrainer
from trl_refine.rollout import GenericEngine, OnePassEngine, RolloutEngine, SnapshotEngine
from trl_refine.rollout.registry import FAST_ENGINES
from trl_refine.trainer import engine_training_problem

BUILT_IN = sorted({GenericEngine, SnapshotEngine, OnePassEngine, *FAST_ENGINES.values()}, key=lambda c: c.name)


@pytest.mark.parametrize("cls", BUILT_IN, ids=lambda c: c.name)
def test_every_built_in_engine_declares_every_ability_itself(cls):
    missing = [name for name in RolloutEngine.ABILITIES if name not in vars(cls)]
    assert not missing, f"{cls.__name__} inherits {missing} instead of declaring them"


@pytest.mark.parametrize(
    "cls, refused", [(GenericEngine, False), (SnapshotEngine, True), (OnePassEngine, True)], ids=lambda c: str(c)
)
def test_zero3_and_checkpointing_follow_the_declared_abilities(cls, refused):
    engine = cls.__new__(cls)  # abilities are class attributes: no model needed
    zero3 = engine_training_problem(engine, zero_stage=3, activation_checkpointing=False)
    ckpt = engine_training_problem(engine, zero_stage=None, activation_checkpointing=True)
    assert (zero3 is not None, ckpt is not None) == (refused, refused)
    if refused:
        assert cls.name in zero3 and "ZeRO-3" in zero3 and "nsp_engine='generic'" in ckpt
    assert engine_training_problem(engine, zero_stage=2, activation_checkpointing=False) is None


def test_a_claim_counts_whatever_the_class():
    class HeadOutside(GenericEngine):  # not a snapshot engine, but claims the ability
        name = "head_outside"
        applies_lm_head_outside_forward = True

    class CacheFree(SnapshotEngine):  # a snapshot engine that claims neither
        name = "cache_free"
        applies_lm_head_outside_forward = False
        needs_recurrent_cache_in_training = False

    assert "head_outside" in engine_training_problem(HeadOutside(), zero_stage=3, activation_checkpointing=False)
    assert engine_training_problem(HeadOutside(), zero_stage=None, activation_checkpointing=True) is None
    assert engine_training_problem(CacheFree(), zero_stage=3, activation_checkpointing=True) is None


def test_trainer_refuses_checkpointing_for_the_one_pass_engine_unless_ntp_only(tmp_path, byte_tokenizer):
    ds = Dataset.from_dict({"text": documents(2)})

    def build(**kw):
        args = small_config(tmp_path, gradient_checkpointing=True, **kw)
        return NSPGRPOTrainer(
            tiny_delta_net(), args=args, train_dataset=ds, processing_class=byte_tokenizer, engine="onepass"
        )

    with pytest.raises(ValueError, match="onepass engine"):
        build()
    assert build(nsp_coef=0.0).engine.name == "onepass"  # NTP only: the engine never runs

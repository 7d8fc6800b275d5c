import math

import pytest
import torch

from trl_refine.advantages import group_advantages
from trl_refine.rewards import builtin_reward_funcs, cosine_reward, exact_match_reward, hybrid_reward


def reward_kwargs():
    # two rollouts, k = 2, hidden size 2
    rollout_h = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [3.0, 4.0]])]
    truth_h = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [3.0, 4.0]])]
    return dict(
        prompts=["a", "b"],
        completions=["x", "y"],
        completion_ids=[[5, 6], [7, 8]],
        ground_truth_ids=[torch.tensor([5, 9]), torch.tensor([7, 8])],
        rollout_hidden_states=rollout_h,
        ground_truth_hidden_states=truth_h,
    )


def test_cosine_exact_hybrid_by_hand():
    kw = reward_kwargs()
    cos = cosine_reward(**kw)
    # row 0: cos = (1 + 0) / 2; row 1: (1/sqrt(2) + 1) / 2
    assert cos[0] == pytest.approx(0.5)
    assert cos[1] == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    ex = exact_match_reward(**kw)
    assert ex == [0.5, 1.0]  # a fraction, not all-or-nothing
    hy = hybrid_reward(**kw)
    assert hy == pytest.approx([c + e for c, e in zip(cos, ex)])


def test_builtin_reward_selection():
    funcs, weights = builtin_reward_funcs("hybrid")
    assert funcs == [cosine_reward, exact_match_reward] and weights == [1.0, 1.0]
    assert builtin_reward_funcs("exact")[0] == [exact_match_reward]
    with pytest.raises(ValueError):
        builtin_reward_funcs("bleu")


def test_document_grouping_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 1.0])
    adv, _ = group_advantages(rewards, group_size=4)
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std()  # unbiased, as the official code
    assert torch.allclose(adv[:4], (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / (std + 1e-6))
    assert torch.allclose(
        adv[4:], (torch.tensor([0.0, 0.0, 1.0, 1.0]) - 0.5) / (torch.tensor([0, 0, 1.0, 1]).std() + 1e-6)
    )


def test_prefix_grouping_and_all_equal_rewards():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])
    adv, std = group_advantages(rewards, group_size=2)
    s = torch.tensor([1.0, 3.0]).std()
    assert torch.allclose(adv[:2], torch.tensor([-1.0, 1.0]) / (s + 1e-6))
    assert torch.equal(adv[2:], torch.zeros(2))  # equal rewards: zero advantage, no NaN
    assert std[2] == 0
    flat, _ = group_advantages(torch.full((8,), 0.7), group_size=8)
    assert not torch.isnan(flat).any() and flat.abs().max() == 0


def test_singleton_groups_and_nan_rows():
    adv, _ = group_advantages(torch.tensor([0.3, -0.2]), group_size=1)
    assert torch.allclose(adv, torch.tensor([0.3, -0.2]) / (1 + 1e-6))  # official: mean 0, std 1
    adv, _ = group_advantages(torch.tensor([1.0, float("nan"), 3.0, 5.0]), group_size=4)
    assert adv[1] == 0 and not torch.isnan(adv).any()
    assert torch.allclose(adv[[0, 2, 3]], (torch.tensor([1.0, 3.0, 5.0]) - 3) / (2 + 1e-6))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), group_size=2)

import pytest
import torch

from trl_refine.config import default_smoothing_width, min_document_length
from trl_refine.selection import chunk_bounds, select_positions, selection_probabilities, smooth_entropy


def left_padded(lengths, total):
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, total - n :] = 1
    return mask


def test_smoothing_width_rule():
    assert default_smoothing_width(5) == 5
    assert default_smoothing_width(4) == 5
    assert default_smoothing_width(1) == 1
    x = torch.zeros(1, 11)
    x[0, 5] = 5.0
    y = smooth_entropy(x, 5)
    assert torch.allclose(y[0, 3:8], torch.ones(5))  # spread evenly over the 5-wide window
    assert y[0, :3].abs().sum() == 0 and y[0, 8:].abs().sum() == 0
    assert torch.equal(smooth_entropy(x, 1), x)
    with pytest.raises(ValueError):
        smooth_entropy(x, 4)


def test_chunks_cover_valid_tokens_only_with_left_padding():
    mask = left_padded([100, 37], 120)
    first = 120 - mask.sum(-1)
    start, end = chunk_bounds(first, 120, 8)
    assert torch.equal(start[:, 0], first)
    assert bool((end <= 120).all())
    assert bool((start[:, 1:] == end[:, :-1]).all())  # contiguous, equal chunks
    assert torch.equal(end[:, -1] - start[:, 0], 8 * ((120 - first) // 8))


@pytest.mark.parametrize("strategy", ["entropy", "uniform", "argmax", "argmin"])
def test_margins_hold_for_any_length(strategy):
    n, k, margin = 8, 5, 20
    lo_len = min_document_length(n, k, margin)
    g = torch.Generator().manual_seed(0)
    for length in list(range(lo_len, lo_len + 40)) + [257, 1000]:
        total = length + 13
        mask = left_padded([length, total], total)
        entropy = torch.rand(2, total, generator=g) * 5
        pos = select_positions(
            entropy, mask, num_chunks=n, rollout_length=k, margin=margin, strategy=strategy, generator=g
        )
        first = total - mask.sum(-1)
        r = pos + 1  # continuation start
        assert bool((r - first[:, None] >= margin).all()), (length, pos)
        assert bool((total - r >= max(k, margin)).all()), (length, pos)
        assert bool((r + k <= total).all())


def test_argmax_argmin_pick_chunk_extremes():
    total = 400
    mask = left_padded([400], total)
    entropy = torch.zeros(1, total)
    for j, peak in enumerate([70, 120, 170, 220, 270, 320]):
        entropy[0, peak - 2 : peak + 3] = torch.tensor([1.0, 2.0, 4.0, 2.0, 1.0]) * (1 + j)  # unique smoothed max
    pos = select_positions(entropy, mask, num_chunks=8, rollout_length=5, margin=20, strategy="argmax")
    # chunks are 50 wide; a peak's smoothed window is centred on it
    assert pos[0, 1:7].tolist() == [70, 120, 170, 220, 270, 320]
    low = torch.ones(1, total) * 3
    low[0, 128:133] = torch.tensor([1.0, -2.0, -10.0, -2.0, 1.0])
    pos = select_positions(low, mask, num_chunks=8, rollout_length=5, margin=20, strategy="argmin")
    assert pos[0, 2].item() == 130


def test_entropy_sampling_matches_softmax_of_smoothed_entropy():
    total, n = 64, 2
    mask = left_padded([60], total)
    g = torch.Generator().manual_seed(1)
    entropy = torch.rand(1, total, generator=g) * 3
    probs = selection_probabilities(entropy, mask, num_chunks=n, smoothing_width=5, temperature=0.7)
    draws = 40000
    counts = torch.zeros(n, total)
    batch_entropy = entropy.expand(draws, total)
    batch_mask = mask.expand(draws, total)
    pos = select_positions(
        batch_entropy, batch_mask, num_chunks=n, rollout_length=1, margin=1, temperature=0.7, generator=g
    )
    for j in range(n):
        counts[j] = torch.bincount(pos[:, j], minlength=total).float() / draws
    # positions clamped at the margins move mass; compare away from the two ends
    inner = slice(6, total - 2)
    assert torch.allclose(counts[:, inner], probs[0, :, inner], atol=0.01)
    # uniform strategy: flat within chunks
    pos = select_positions(
        batch_entropy, batch_mask, num_chunks=n, rollout_length=1, margin=1, strategy="uniform", generator=g
    )
    freq = torch.bincount(pos[:, 1], minlength=total).float() / draws
    assert torch.allclose(freq[34:62], torch.full((28,), 1 / 30), atol=0.01)


def test_right_padding_is_rejected():
    mask = torch.ones(1, 100, dtype=torch.long)
    mask[0, -5:] = 0
    with pytest.raises(ValueError, match="left-padded"):
        select_positions(torch.rand(1, 100), mask, num_chunks=2, rollout_length=5, margin=5)

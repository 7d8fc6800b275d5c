"""The official procedure of the benchmark (benchmarks/official_procedure.py) on CPU at tiny size: its prefixes are
the release's (left-padded to the document width, repeated G times), and one step trains the model."""

import sys
from pathlib import Path

import torch
from conftest import tiny_delta_net

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from official_procedure import left_padded_prefixes, official_step  # noqa: E402

from trl_refine.rollout import DocumentBatch  # noqa: E402


def test_prefixes_are_left_padded_to_the_document_width():
    ids = torch.arange(1, 21).view(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    docs = DocumentBatch(ids, mask)
    pos = torch.tensor([[4, 8], [5, 9]])
    prefix, prefix_mask, row_doc, row_pos = left_padded_prefixes(docs, pos, g=2)
    assert prefix.shape == (8, 10)
    assert row_doc.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and row_pos.tolist() == [4, 4, 8, 8, 5, 5, 9, 9]
    assert prefix[0].tolist() == [0] * 5 + [1, 2, 3, 4, 5]
    assert prefix_mask[0].tolist() == [0] * 5 + [1] * 5
    assert torch.equal(prefix[0], prefix[1])  # G copies, interleaved
    # document 1 starts at column 3: the prefix keeps its own padding, masked
    assert prefix[4, -6:].tolist() == [11, 12, 13, 14, 15, 16] and prefix_mask[4].tolist() == [0] * 7 + [1] * 3
    assert prefix[6].tolist() == ids[1].tolist() and prefix_mask[6].tolist() == mask[1].tolist()


def test_one_official_step_trains_and_times_its_phases():
    model = tiny_delta_net(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 384, (3, 120), generator=g)
    docs = DocumentBatch(ids, torch.ones_like(ids))
    phases = []
    before = [p.detach().clone() for p in model.parameters()]
    official_step(margin=8, mark=phases.append)(model, opt, docs, 3, 2, 5)
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert moved == len(before)
    assert phases[0].startswith("scan") and phases[-1] == "optimizer" and len(phases) == 8
    assert model.training

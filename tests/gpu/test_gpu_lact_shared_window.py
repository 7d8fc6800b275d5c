"""GPU (marked `gpu`, skipped without CUDA): LaCT at the 760M layer shape (hidden 1536, 24 attention heads, 4
fast-weight heads, low rank 32, window = chunk = 2048) with 4 layers, one 8K document, n = 8, G = 8, k = 5, fp32:
one ReFINE step (sampling pass reused for the loss, decode, loss forward, backward) with the attention window
shared between the G branches of a prefix (the default) against one copy per branch. Checks parity and reports both
peaks of ``torch.cuda.max_memory_allocated``; ``TRL_REFINE_LACT_WINDOW_RESULTS=path.json`` writes them.

Same measurement from the command line (any shape, e.g. ``--layers 24``):
``python benchmarks/lact_window_memory.py --device cuda --hidden 1536 --heads 24 --lact-heads 4 --low-rank 32
--window 2048 --length 8192 --vocab 32000 --layers 4``.
"""

import json
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import lact_window_memory as bench  # noqa: E402

SHAPE_760M = [
    "--device", "cuda", "--hidden", "1536", "--heads", "24", "--lact-heads", "4", "--low-rank", "32",
    "--window", "2048", "--length", "8192", "--vocab", "32000", "--layers", "4",
]  # fmt: skip


def test_lact_shared_window_parity_and_memory_at_760m_shape():
    torch.backends.cuda.matmul.allow_tf32 = False
    args = bench.parse_args(SHAPE_760M)
    rows, outputs = [], {}
    for share in (False, True):
        row, outputs[row["variant"]] = bench.measure(args, share)
        rows.append(row)
        torch.cuda.empty_cache()
    result = bench.summary(args, rows, outputs)
    result["device"] = torch.cuda.get_device_name()
    print(json.dumps(result, indent=2))
    path = os.environ.get("TRL_REFINE_LACT_WINDOW_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    par = result["parity_share_vs_copy"]
    assert par["rollout_ids_equal"]
    for key in ("logps_rel", "hidden_rel", "rollout_logps_rel", "grad_rel"):
        assert par[key] < 1e-4, (key, par[key])
    copy, share = rows
    # the copied windows of the 64 branch rows (K and V, fp32, 4 layers: 3 GiB per set) are held more than once
    saved = copy["cuda_peak_mib"] - share["cuda_peak_mib"]
    assert saved > result["windows_mib"]["copied"] - result["windows_mib"]["shared"], (copy, share)

"""Relative change of every weight between two checkpoints: ||after - before|| / ||before||, overall and the largest
tensors' (the check that a training run moved the weights at all)."""

from __future__ import annotations

import glob
import json
import os
import sys

import torch
from safetensors.torch import load_file


def weights(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update({k: v.float() for k, v in load_file(f).items()})
    if not out:
        raise FileNotFoundError(f"no *.safetensors under {path}")
    return out


def relative_change(before: str, after: str) -> dict:
    a, b = weights(before), weights(after)
    common = sorted(set(a) & set(b))
    num = sum(float((b[k] - a[k]).pow(2).sum()) for k in common)
    den = sum(float(a[k].pow(2).sum()) for k in common)
    per = {k: float((b[k] - a[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in common}
    moved = sum(1 for v in per.values() if v > 0)
    return {
        "tensors": len(common),
        "tensors_changed": moved,
        "relative_change": (num / max(den, 1e-30)) ** 0.5,
        "max_tensor_change": max(per.values()),
        "nonfinite": any(not torch.isfinite(b[k]).all() for k in common),
    }


if __name__ == "__main__":
    print(json.dumps(relative_change(sys.argv[1], sys.argv[2])))

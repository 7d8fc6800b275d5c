"""NSPGRPOTrainer with ``fla_gated_kernel="trl_refine"`` on a one-layer fla GatedDeltaNet, CPU fp32 under
TRITON_INTERPRET=1: one training step (scan, one-pass rollouts, loss, backward, optimizer step), with our gated op
counted where the swap installs it. fla's own chunk op cannot run under the interpreter, so a step that finishes
ran ours on every chunk-mode call. Prints one JSON line: op calls during train(), whether fla's op name is back
after it, how far the weights moved.

Run by tests/test_fla_gated_kernel_option.py in a subprocess."""

import importlib
import json
import os
import sys
import tempfile
import time

import torch
from _interpreter import rel  # noqa: F401, E402  (first: turns the Triton interpreter on)
from datasets import Dataset  # noqa: E402
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import trl_refine.kernels.fla_gated_patch as patch  # noqa: E402
from trl_refine import NSPGRPOConfig, NSPGRPOTrainer  # noqa: E402

t_start = time.time()
calls = {"n": 0}
ours = patch.chunk_gated_delta_rule


def counted(*args, **kwargs):
    calls["n"] += 1
    return ours(*args, **kwargs)


patch.chunk_gated_delta_rule = counted  # what the block installs
layer_module = importlib.import_module(patch.FLA_LAYER_MODULE)
fla_op = getattr(layer_module, patch.FLA_OP_NAME)

torch.manual_seed(0)
cfg = GatedDeltaNetConfig(
    hidden_size=32, num_hidden_layers=1, num_heads=2, head_dim=16, vocab_size=384, attn_mode="chunk",
    fuse_cross_entropy=False, fuse_norm=False, fuse_swiglu=False, use_short_conv=False,
)  # fmt: skip
model = GatedDeltaNetForCausalLM(cfg).float()
before = [p.detach().clone() for p in model.parameters()]
words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
gen = torch.Generator().manual_seed(0)
docs = [" ".join(words[i] for i in torch.randint(len(words), (12,), generator=gen).tolist()) for _ in range(2)]
with tempfile.TemporaryDirectory() as out:
    args = NSPGRPOConfig(
        output_dir=out, bf16=False, use_cpu=True, report_to="none", max_steps=1, learning_rate=1e-2,
        nsp_num_chunks=2, nsp_rollout_length=2, nsp_margin=4, nsp_reward="exact", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, fla_gated_kernel="trl_refine",
    )  # fmt: skip
    trainer = NSPGRPOTrainer(
        model, args=args, train_dataset=Dataset.from_dict({"text": docs}), processing_class=ByT5Tokenizer()
    )
    assert calls["n"] == 0
    trainer.train()
moved = max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))
print(
    json.dumps(
        {
            "engine": trainer.engine.name,
            "op_calls": calls["n"],
            "restored": getattr(layer_module, patch.FLA_OP_NAME) is fla_op,
            "max_weight_change": moved,
            "seconds": round(time.time() - t_start, 1),
        }
    )
)

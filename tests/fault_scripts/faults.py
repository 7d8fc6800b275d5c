"""Fault-injection runs for tests/test_faults.py (imported by the test, or run as a script).

    python tests/fault_scripts/faults.py OUT kill-train|kill-save STEP     # SIGKILLs itself at STEP
    torchrun --nproc_per_node 2 tests/fault_scripts/faults.py OUT dist     # 2 gloo processes: uneven data, NaN

One tiny Llama, 8 documents, one document per step, a checkpoint every step: an interrupted run resumed with
``resume_from_checkpoint="last"`` must log the same losses and end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from datetime import timedelta
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from conftest import documents, small_config, tiny_llama  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import ByT5Tokenizer, TrainerCallback  # noqa: E402

from trl_refine import NSPGRPOTrainer  # noqa: E402
from trl_refine.guards import DivergenceError  # noqa: E402

MAX_STEPS = 3


def make_trainer(out: Path, num_docs: int = 8, callbacks=(), **overrides) -> NSPGRPOTrainer:
    kwargs = dict(
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=1,
        seed=3,
        shuffle_dataset=False,
        nsp_max_length=96,  # short documents: a step takes a fraction of a second
    )
    kwargs.update(overrides)
    args = small_config(out, **kwargs)
    args.output_dir = str(out)
    return NSPGRPOTrainer(
        tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict({"text": documents(num_docs)}),
        processing_class=ByT5Tokenizer(),
        callbacks=list(callbacks),
    )


def losses(log_history: list[dict]) -> dict[int, float]:
    return {int(h["step"]): h["loss"] for h in log_history if "loss" in h}


class KillAtStep(TrainerCallback):
    """SIGKILL this process when optimizer step ``step`` begins (the checkpoints before it are complete)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_during_save(trainer: NSPGRPOTrainer, step: int) -> None:
    """SIGKILL this process inside the save of checkpoint ``step``: after its weights, before its optimizer, RNG and
    trainer state (the order of `Trainer._save_checkpoint`)."""
    save_model = trainer.save_model

    def save_then_die(output_dir=None, _internal_call=False):
        save_model(output_dir, _internal_call=_internal_call)
        if output_dir and output_dir.rstrip("/").endswith(f"checkpoint-{step}"):
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.save_model = save_then_die


class PoisonWeights(TrainerCallback):
    """Fill the input embeddings with NaN when optimizer step ``step`` begins (on ``rank`` only, if given)."""

    def __init__(self, step: int, rank: int | None = None):
        self.step, self.rank = step, rank

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step and self.rank in (None, args.process_index):
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(float("nan"))


def phase_dist(out: Path) -> None:
    """2 processes: 5 documents (one of them dropped each epoch, the run crosses epochs), then a NaN injected into
    rank 0's weights only: both ranks must stop at the same step with the same message instead of one crashing and
    the other hanging in a collective."""
    rank = int(os.environ.get("RANK", 0))
    record = {}
    trainer = make_trainer(out / "uneven", num_docs=5, max_steps=4, save_strategy="no")
    trainer.train()
    record["uneven_steps"] = trainer.state.global_step
    record["uneven_losses"] = losses(trainer.state.log_history)
    trainer = make_trainer(out / "nan", callbacks=[PoisonWeights(2, rank=0)], save_steps=1)
    try:
        trainer.train()
        record["nan"] = "no error"
    except DivergenceError as err:
        record["nan"] = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    if mode == "dist":
        torch.distributed.init_process_group(
            "gloo", timeout=timedelta(seconds=int(os.environ.get("FAULT_DIST_TIMEOUT", "60")))
        )
        phase_dist(out)
        torch.distributed.destroy_process_group()
        return
    step = int(sys.argv[3])
    if mode == "kill-train":
        make_trainer(out, callbacks=[KillAtStep(step)]).train()
    elif mode == "kill-save":
        trainer = make_trainer(out)
        kill_during_save(trainer, step)
        trainer.train()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    raise SystemExit("the run was not killed")


if __name__ == "__main__":
    main()

"""Fault injection (issue 15): SIGKILL during training and during a save, then resume; NaN injection; uneven data and
a NaN on one of 2 gloo processes. The scenarios live in tests/fault_scripts/faults.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "fault_scripts" / "faults.py"
TIMEOUT = 300  # seconds for one launch (about 20 s on 2 cores)


def _load_script():
    spec = importlib.util.spec_from_file_location("faults", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


faults = _load_script()


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_script(*argv: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
        ]
    proc = subprocess.Popen(
        [*cmd, str(SCRIPT), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
        start_new_session=True,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session started above: the launcher and its ranks
        out, _ = proc.communicate()
        pytest.fail(f"{argv} hung (killed after {TIMEOUT} s)\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run: losses per step and final weights."""
    trainer = faults.make_trainer(tmp_path_factory.mktemp("full"))
    trainer.train()
    return faults.losses(trainer.state.log_history), {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _assert_same_run(trainer, uninterrupted):
    ref_losses, ref_weights = uninterrupted
    got = faults.losses(trainer.state.log_history)
    assert sorted(got) == sorted(ref_losses) == list(range(1, faults.MAX_STEPS + 1))
    for step, loss in ref_losses.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    state = trainer.model.state_dict()
    assert max(float((state[k] - v).abs().max()) for k, v in ref_weights.items()) < 1e-6


@pytest.mark.parametrize("mode", ["kill-train", "kill-save"])
def test_sigkill_then_resume_last_reproduces_the_uninterrupted_run(tmp_path, mode, uninterrupted, caplog):
    """SIGKILL when step 3 begins, or inside the save of checkpoint-3 (weights written, trainer state not): resuming
    with resume_from_checkpoint='last' uses checkpoint-2 (skipping the incomplete checkpoint-3 with a message) and
    logs the same losses and ends with the same weights as the uninterrupted run."""
    proc = run_script(str(tmp_path), mode, "3")
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:]
    complete = (tmp_path / "checkpoint-3" / "trainer_state.json").exists()
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").exists() and not complete
    if mode == "kill-save":
        assert (tmp_path / "checkpoint-3" / "model.safetensors").exists()  # a half-written checkpoint
    trainer = faults.make_trainer(tmp_path)
    with caplog.at_level("WARNING", logger="trl_refine"):
        trainer.train(resume_from_checkpoint="last")
    if mode == "kill-save":
        assert "skipping the incomplete checkpoint" in caplog.text and "checkpoint-3" in caplog.text
    assert f"resuming from {tmp_path / 'checkpoint-2'}" in caplog.text
    _assert_same_run(trainer, uninterrupted)


def test_nan_weights_stop_before_the_save_and_keep_the_last_good_checkpoint(tmp_path):
    """NaN weights at step 3 with save_total_limit=1: the run stops at step 3 naming checkpoint-2, which is kept and
    finite (before: NaN weights were saved over it, then torch.multinomial failed inside the selection)."""
    from safetensors.torch import load_file

    trainer = faults.make_trainer(tmp_path, callbacks=[faults.PoisonWeights(3)], save_total_limit=1)
    with pytest.raises(faults.DivergenceError, match=r"diverged at step 3: the entropy .* is nan.*checkpoint-2"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not any(h.get("step") == 3 for h in trainer.state.log_history)


class PoisonGradients(faults.TrainerCallback):
    """A NaN gradient on one weight during optimizer step ``step`` (finite loss), and a record of the weights."""

    def __init__(self, step: int):
        self.step, self.handle, self.weights = step, None, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            weight = model.get_input_embeddings().weight
            self.handle = weight.register_hook(lambda grad: grad * float("nan"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_nan_gradient_skips_the_step_with_skip_and_stops_by_default(tmp_path, caplog):
    poison = PoisonGradients(2)
    trainer = faults.make_trainer(tmp_path / "skip", callbacks=[poison], nsp_on_divergence="skip", save_strategy="no")
    with caplog.at_level("WARNING", logger="trl_refine"):
        trainer.train()
    assert trainer.state.global_step == 3 and trainer.divergence_guard.skipped_steps == [2]
    assert "skipped optimizer step 2 (the gradient norm is nan)" in caplog.text
    w = poison.weights
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])  # step 2 left every weight as it was
    assert any(not torch.equal(w[2][k], w[3][k]) for k in w[2])  # step 3 trained again
    assert all(torch.isfinite(v).all() for v in w[3].values())

    trainer = faults.make_trainer(tmp_path / "stop", callbacks=[PoisonGradients(2)])
    with pytest.raises(faults.DivergenceError, match=r"step 2: the gradient norm is nan.*checkpoint-1"):
        trainer.train()
    assert not (tmp_path / "stop" / "checkpoint-2").exists()


def test_two_processes_uneven_data_and_a_nan_on_one_rank(tmp_path):
    """2 gloo processes: 5 documents over 4 steps (one document dropped per epoch, two epochs) train without a hang;
    NaN weights on rank 0 only stop both ranks at step 2 with the same message (before: rank 0 failed inside
    torch.multinomial and rank 1 waited in a collective until the timeout)."""
    proc = run_script(str(tmp_path), "dist", torchrun=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["uneven_steps"] == r1["uneven_steps"] == 4
    assert sorted(map(int, r0["uneven_losses"])) == [1, 2, 3, 4]
    assert r0["nan"] == r1["nan"]
    assert "diverged at step 2: the entropy" in r0["nan"] and "checkpoint-1" in r0["nan"]


def test_nan_loss_stops_before_the_backward_reaches_the_weights(tmp_path):
    """NaN document log-probs at step 2 (the weights are finite): the NTP loss is caught before the optimizer step."""
    import dataclasses

    trainer = faults.make_trainer(tmp_path)
    forward_train, calls = trainer.engine.forward_train, []

    def nan_at_step_two(*args, **kwargs):
        out = forward_train(*args, **kwargs)
        calls.append(trainer.state.global_step)
        return dataclasses.replace(out, doc_logps=out.doc_logps * float("nan")) if len(calls) == 2 else out

    trainer.engine.forward_train = nan_at_step_two
    with pytest.raises(faults.DivergenceError, match=r"step 2: the NTP loss is nan.*checkpoint-1"):
        trainer.train()
    assert not (tmp_path / "checkpoint-2").exists()


class PoisonAfterUpdate(faults.TrainerCallback):
    """Non-finite weights right after optimizer step ``step`` (finite loss and gradients)."""

    def __init__(self, step: int):
        self.step = step

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.get_input_embeddings().weight[0, 0] = float("inf")


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = faults.make_trainer(tmp_path, callbacks=[PoisonAfterUpdate(2)])
    with pytest.raises(faults.DivergenceError, match=r"step 2: a weight of the model is not finite; it was not saved"):
        trainer.train()
    assert (tmp_path / "checkpoint-1").exists() and not (tmp_path / "checkpoint-2").exists()


def test_skip_gives_up_after_consecutive_non_finite_steps(tmp_path):
    """`nsp_on_divergence="skip"` drops gradients step after step, but a run that only diverges stops."""
    from types import SimpleNamespace

    from trl_refine.guards import MAX_CONSECUTIVE_SKIPS, DivergenceGuard

    guard = DivergenceGuard("skip")
    model = torch.nn.Linear(2, 2)
    state = SimpleNamespace(global_step=0)
    for step in range(1, MAX_CONSECUTIVE_SKIPS):
        model.weight.grad = torch.ones_like(model.weight)
        guard.observe(state, "the NTP loss", float("inf"))
        guard.on_pre_optimizer_step(None, state, None, model=model)
        assert model.weight.grad is None and guard.skipped_steps[-1] == step
        state.global_step += 1
    guard.observe(state, "the NTP loss", float("nan"))
    with pytest.raises(faults.DivergenceError, match=rf"step {MAX_CONSECUTIVE_SKIPS}: the NTP loss is nan, for the "):
        guard.on_pre_optimizer_step(None, state, None, model=model)
    guard = DivergenceGuard("skip")  # a finite step in between resets the count
    guard.observe(state, "the gradient norm", 1.0)
    guard.on_pre_optimizer_step(None, state, None, model=model)
    assert guard.skipped_steps == []

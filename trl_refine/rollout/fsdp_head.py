"""Keep the FSDP2 group that owns the LM-head weight gathered while the snapshot engine uses the weight itself.

The snapshot engine applies the LM head to captured hidden states outside the model call, in checkpointed chunks
whose backward recomputes the logits from the head weight (`modeling_utils.lm_head_logps`). Under FSDP2 that weight
is the unsharded parameter of one FSDP group: the root in a plain ``fully_shard`` layout, or the ``[final norm,
LM head]`` group that accelerate (1.15) carves out. FSDP may free that parameter's storage between the engine's
calls: after a forward (``reshard_after_forward``), and after the backward of one model call
(``reshard_after_backward``) while chunks of another call still have to be recomputed. A chunk then reads freed
storage (``setStorage ... storage of size 0``: seen on 2 H200s with torch 2.11). Calling the head *module* instead
would make FSDP all-gather once per chunk, a number that differs between ranks, which hangs the job.

`hold_lm_head` switches both reshards off for that one group while a pass runs. When the pass built a graph, the
group stays gathered until the graph has been backpropagated, and is resharded (its settings restored) at the very
end of the backward, after FSDP's own end-of-backward work (gradient reduce-scatter); so the optimizer step updates
the shards and the next call all-gathers fresh weights. Without a graph it is resharded when the pass ends.
Resharding only frees local memory (no collective), so ranks stay in step. Nested holds (two passes before one
backward) are counted. Models that are not sharded by FSDP2 are left alone (DDP, DeepSpeed, one device).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.autograd import Variable

from trl_refine._compat import (
    fsdp2_auto_reshard_after_forward,
    fsdp2_clear_leftover_forward_state,
    fsdp2_param_groups,
    fsdp2_state,
    fsdp2_training_states,
    set_fsdp2_auto_reshard_after_forward,
)
from trl_refine.modeling_utils import unwrap

_HOLD_ATTR = "_nsp_head_hold"


def fsdp2_owner_of_lm_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The FSDP2 module whose parameter group holds the LM-head weight (the nearest ``FSDPModule`` among the head
    and its ancestors), or ``None`` if the model is not sharded by FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no public FSDP2
        return None
    base = unwrap(model)
    head = base.get_output_embeddings()
    if head is None:
        return None
    name = next((n for n, m in base.named_modules() if m is head), None)
    if name is None:
        return None
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        module = base.get_submodule(".".join(parts[:depth]))
        if isinstance(module, FSDPModule):
            return module
    return None


class _Hold:
    """Reference-counted hold on one FSDP2 module's parameter groups (stored on the module)."""

    def __init__(self, owner: torch.nn.Module, head: torch.nn.Module):
        self.owner, self.head, self.count = owner, head, 0
        self.saved: list[tuple] = []

    def acquire(self) -> None:
        if self.count == 0:
            state = fsdp2_state(self.owner)
            self.saved = [
                (group, group.post_forward_mesh_info, group.reshard_after_backward)
                for group in fsdp2_param_groups(self.owner)
            ]
            self.saved_auto = fsdp2_auto_reshard_after_forward(state)
            self.owner.set_reshard_after_forward(False, recurse=False)
            self.owner.set_reshard_after_backward(False, recurse=False)
        self.count += 1

    def release(self) -> None:
        self.count -= 1
        if self.count > 0:
            return
        state = fsdp2_state(self.owner)
        for group, mesh_info, after_backward in self.saved:
            group.post_forward_mesh_info = mesh_info
            group.reshard_after_backward = after_backward
        if self.saved_auto is not None:
            set_fsdp2_auto_reshard_after_forward(state, self.saved_auto)
        self.saved = []
        self.owner.reshard()
        if self._gathered():
            # A partial forward of a grouped ``fully_shard([norm, head])`` (TRL's fused head runs the norm but not
            # the head module) can leave the group in the FORWARD state, where reshard() keeps it gathered when it
            # does not reshard after forward. No model call is running here, so the state is a leftover.
            fsdp2_clear_leftover_forward_state(fsdp2_param_groups(self.owner))
            self.owner.reshard()
        if self._gathered():
            # still the gathered tensor: the optimizer would update the shards and the next call would read this
            # stale copy; better to stop than to train on it
            raise RuntimeError(
                "FSDP2 did not reshard the LM-head group after the snapshot engine's pass (its training state is "
                f"{fsdp2_training_states(fsdp2_param_groups(self.owner))}); the next step would read "
                "stale head weights. Use nsp_engine='generic' with FSDP2, or DDP / DeepSpeed ZeRO-2 with the snapshot "
                "engine, and report the torch version."
            )

    def _gathered(self) -> bool:
        weight = self.head.weight
        return weight.numel() > 0 and not hasattr(weight, "to_local")


@contextmanager
def hold_lm_head(model: torch.nn.Module) -> Iterator[HeadHold]:
    """Keep the LM-head weight gathered for the body of the ``with``; see the module docstring."""
    hold = HeadHold(model)
    hold.acquire()
    try:
        yield hold
    except BaseException:
        hold.release()
        raise
    if not hold.deferred:
        hold.release()


class HeadHold:
    """One pass's hold (no-op unless the model is sharded by FSDP2)."""

    def __init__(self, model: torch.nn.Module):
        owner = fsdp2_owner_of_lm_head(model)
        self._hold: _Hold | None = None
        if owner is not None:
            hold = getattr(owner, _HOLD_ATTR, None)
            if hold is None:
                hold = _Hold(owner, unwrap(model).get_output_embeddings())
                setattr(owner, _HOLD_ATTR, hold)
            self._hold = hold
        self.deferred = False

    @property
    def active(self) -> bool:
        return self._hold is not None

    def acquire(self) -> None:
        if self._hold is not None:
            self._hold.acquire()

    def release(self) -> None:
        if self._hold is not None:
            self._hold.release()

    def release_after_backward(self, outputs: Sequence[torch.Tensor]) -> None:
        """Release once a backward has run through any of ``outputs``, after everything else that backward does.

        The gradient hook fires early in the backward, before FSDP queues its end-of-backward callback; the callback
        queued here therefore queues the release once more, so that it runs after FSDP's."""
        if self._hold is None:
            return
        outputs = [t for t in outputs if t.requires_grad]
        if not outputs:
            return
        hold, fired = self._hold, []

        def queue_again() -> None:
            Variable._execution_engine.queue_callback(hold.release)

        def on_first_grad(_grads) -> None:
            if not fired:
                fired.append(True)
                Variable._execution_engine.queue_callback(queue_again)

        torch.autograd.graph.register_multi_grad_hook(outputs, on_first_grad, mode="any")
        self.deferred = True

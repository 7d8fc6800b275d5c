"""Known, harmless warnings that would otherwise greet every run; imported first by ``trl_refine``.

Each filter matches one message exactly (a regex anchored at its start), so anything else still shows.
"""

from __future__ import annotations

import warnings

#: (category, message start) of the warnings we silence, and why they are harmless
KNOWN_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"Triton is not supported on current platform", "fla imported on a CPU machine: it falls back"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", "TRL 1.16 reads transformers' deprecated property"),
)


def silence_known_warnings() -> None:
    for category, message, _why in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


silence_known_warnings()

"""Run a script under the Triton interpreter on CPU (fla's kernels, slowly; tiny shapes only):

    python experiments/replication/interpret.py experiments/tiny_base/pretrain.py --device cpu --sweep smoke_gated ...

Sets ``TRITON_INTERPRET=1`` and keeps one configuration per autotuner (the interpreter cannot benchmark them) before
fla defines its kernels, as the interpreter tests do (tests/interpret_scripts/_interpreter.py), then runs the script
as ``__main__`` with the remaining arguments."""

import os
import runpy
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python experiments/replication/interpret.py SCRIPT [ARGS...]")
    sys.path.insert(0, os.path.join(ROOT, "tests", "interpret_scripts"))
    import _interpreter  # noqa: F401  (turns the interpreter on, one autotune configuration)

    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")

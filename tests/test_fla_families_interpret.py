"""fla families on CPU: the snapshot engine equals the generic engine with fla's own Triton kernels run by the
Triton interpreter (fp32). The other families' runs are recorded in benchmarks/results/fla_families_interpret.json
(`python tests/interpret_scripts/fla_families.py FAMILY [conv] [forward]`); CI runs one, with gradients."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gla_snapshot_equals_generic_under_the_triton_interpreter():
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(root / "tests" / "interpret_scripts" / "fla_families.py"), "gla"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res.pop("rollout_ids_equal") is True
    assert "grad_rel" in res and res.pop("hidden_states_norm") > 0
    for key, value in res.items():
        assert value < 1e-5, (key, value)

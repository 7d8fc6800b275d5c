# Source on a device machine: install the carried wheels (trl, fla, datasets, ...) into /tmp/site-packages.
# The folder name must contain "site-packages": dill (datasets fingerprinting) pickles modules from any other path
# by value, which fails on pyarrow's types.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-packages .whl/*.whl || return 1
python3 -c "import pandas, dateutil" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-packages .whl_opt/*.whl || return 1
export PYTHONPATH=/tmp/site-packages:$PWD
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 - <<'PY'
import importlib, torch, triton, transformers, trl, fla
# every runtime dependency of setup.cfg: a missing one is named here, not minutes into a run (rouge: LongBench scoring)
missing = [m for m in ("accelerate", "peft", "datasets", "evaluate", "rouge", "rapidfuzz", "matplotlib", "yaml", "tqdm")
           if importlib.util.find_spec(m) is None]
if missing:
    print(f"WARNING: missing on this machine: {missing}; add their wheels in benchmarks/fetch_device_wheels.sh")
print(f"torch {torch.__version__} triton {triton.__version__} transformers {transformers.__version__} trl {trl.__version__} fla {fla.__version__}")
print(torch.cuda.get_device_name(0), torch.cuda.device_count(), "GPU(s)")
PY

"""Model code we own. Importing this module registers our models with the transformers Auto classes.

* ``refine_delta_net``: a pure-PyTorch DeltaNet with fla's ``delta_net`` config fields and state-dict keys.
* ``lact_swiglu``: a clean-room LaCT with a recurrent decode state.
"""

from importlib import import_module

__all__ = []

for _name in ("delta_net", "lact"):
    try:
        _mod = import_module(f"trl_refine.models.{_name}")
    except ModuleNotFoundError as err:  # a submodule that is not written yet
        if err.name != f"trl_refine.models.{_name}":
            raise
        continue
    for _sym in getattr(_mod, "__all__", []):
        globals()[_sym] = getattr(_mod, _sym)
        __all__.append(_sym)

"""The shared start of the interpreter scripts: imported first, before fla defines its kernels, it turns on
TRITON_INTERPRET, makes every autotuner keep one configuration (the interpreter cannot benchmark them), and skips
the interpreter's redundant re-patching of ``triton.language`` on every device-function call (see
`_patch_device_calls_once`)."""

import os

os.environ["TRITON_INTERPRET"] = "1"
import inspect  # noqa: E402

import torch  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

_init = autotuner.Autotuner.__init__


def _one_config(self, fn, arg_names, configs, *args, **kwargs):
    _init(self, fn, arg_names, configs[:1], *args, **kwargs)


autotuner.Autotuner.__init__ = _one_config


def _patch_device_calls_once() -> bool:
    """Triton's interpreter patches ``triton.language`` (``inspect.getmembers`` over its modules) at every kernel
    launch, undone when the grid ends, and again at every call of a ``@triton.jit`` device function inside the
    kernel (``tl.sum``, fla's ``exp``), already patched by then: in fla's recurrent kernels that is several calls
    per token step, about half the CPU time. Skip a device function's patch once the running launch has patched
    the same language modules (``triton.language``, ``triton.language.core``); everything else is the
    interpreter's own. Measured on an fla GatedDeltaNet forward (2 layers, 20 tokens, triton 3.9, the shared
    2-core CPU): 7.6 s -> 2.8 s, logits bitwise equal. Returns whether the patch was applied (False, the
    interpreter unchanged, where triton's internals are not the ones this was written against)."""
    grid_cls = getattr(interpreter, "GridExecutor", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if grid_cls is None or patch_lang is None or not hasattr(interpreter, "_LangPatchScope"):
        return False
    running = []  # per running launch: the language modules patched since it started

    def langs(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_once(fn):
        mine = langs(fn)
        if running and running[-1] and mine <= running[-1]:
            return interpreter._LangPatchScope()  # patched already in this launch: nothing new to set or restore
        scope = patch_lang(fn)
        if running:
            running[-1] |= mine
        return scope

    grid_call = grid_cls.__call__

    def tracked_grid_call(self, *args, **kwargs):
        running.append(set())
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            running.pop()

    interpreter._patch_lang = patch_once
    grid_cls.__call__ = tracked_grid_call
    return True


_patch_device_calls_once()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference |a - b| / |b| in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()

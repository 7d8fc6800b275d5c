"""Where the time of the boundary-state delta rule goes, against fla's own op, one layer's shapes (GPU only).

    python benchmarks/profile_boundary_kernel.py --batch 4 --length 8192 --heads 16 --head-dim 128 --positions 8 \
        --out boundary_profile.json

Times (CUDA events, mean of --reps after one warm-up each), bf16 inputs:

* fla's ``chunk_delta_rule`` forward, and forward + backward (gradients on o and the final state);
* the two recurrences alone: fla's ``chunk_gated_delta_rule_fwd_h`` / ``_bwd_dhu`` against ours
  (``recurrent_forward`` / ``recurrent_backward``, the latter with and without boundary-state gradients);
* ours forward, forward + backward without and with ``states_after`` at the positions;
* ``states_after`` alone (forward + backward, from given boundary states) and the fp32 → fla-layout conversion of
  the boundary states (``for_fla``) that the op makes in its forward and again in its backward;
* the fused ``chunk_delta_rule_states_at`` (forward, forward + backward with gradients on o, the final state and the
  states at the positions) and its two recurrences (fla-layout chunk-start states plus the positions' start states;
  the backward with the positions' gradients handed in sparsely);
* the bytes saved for backward (unique storages, inputs included) by the op + ``states_after`` and by the fused op.

Prints a table and writes the JSON (with the device name and versions).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def timed(fn, reps: int) -> float:
    """Milliseconds per call of ``fn`` (one warm-up call first; CUDA events around ``reps`` calls; on CPU, where only
    the Triton interpreter's smoke check runs this script, wall time)."""
    fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--positions", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("profile_boundary_kernel.py needs a CUDA GPU (or TRITON_INTERPRET=1 for a tiny smoke run)")

    import fla
    import triton
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.delta_rule.wy_fast import prepare_wy_repr_fwd

    from trl_refine.kernels._chunk_recurrence import for_fla, position_chunks, recurrent_backward, recurrent_forward
    from trl_refine.kernels.delta_rule_boundary import (
        chunk_delta_rule_states_at,
        chunk_delta_rule_with_boundary_states,
        states_after,
    )

    B, T, H, D, n = a.batch, a.length, a.heads, a.head_dim, a.positions
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter's smoke run: fp32
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, D, device=dev, generator=gen), dim=-1) for _ in "qk")
    q, k = q.to(dt), k.to(dt)
    v = torch.randn(B, T, H, D, device=dev, generator=gen, dtype=dt)
    beta = torch.rand(B, T, H, device=dev, generator=gen, dtype=dt)
    counts = torch.randint(1, T, (B, n), device=dev, generator=gen)
    scale = D**-0.5
    w, u, _ = prepare_wy_repr_fwd(k=k, v=v, beta=beta, cu_seqlens=None, chunk_size=64)
    do = torch.randn_like(v)
    NT = triton.cdiv(T, 64)

    def leaves():
        return [x.clone().requires_grad_() for x in (q, k, v, beta)]

    def fla_fwd():
        with torch.no_grad():
            chunk_delta_rule(q, k, v, beta, scale=scale, output_final_state=True)

    def fla_fwd_bwd():
        lq, lk, lv, lb = leaves()
        o, ht = chunk_delta_rule(lq, lk, lv, lb, scale=scale, output_final_state=True)
        torch.autograd.backward([o, ht], [do, torch.ones_like(ht)])

    def ours_fwd():
        with torch.no_grad():
            chunk_delta_rule_with_boundary_states(q, k, v, beta, scale)

    def ours_fwd_bwd():
        lq, lk, lv, lb = leaves()
        o, hs, ht = chunk_delta_rule_with_boundary_states(lq, lk, lv, lb, scale)
        torch.autograd.backward([o, ht], [do, torch.ones_like(ht)])

    def ours_fwd_bwd_states():
        lq, lk, lv, lb = leaves()
        o, hs, ht = chunk_delta_rule_with_boundary_states(lq, lk, lv, lb, scale)
        after = states_after(hs, ht, lk, lv, lb, counts)
        torch.autograd.backward([o, ht, after], [do, torch.ones_like(ht), torch.ones_like(after)])

    hs0 = torch.randn(B, H, NT, D, D, device=dev, generator=gen)
    ht0 = torch.randn(B, H, D, D, device=dev, generator=gen)

    def states_after_alone():
        hs, ht = hs0.clone().requires_grad_(), ht0.clone().requires_grad_()
        lk, lv, lb = (x.clone().requires_grad_() for x in (k, v, beta))
        after = states_after(hs, ht, lk, lv, lb, counts)
        after.backward(torch.ones_like(after))

    def fused_fwd():
        with torch.no_grad():
            chunk_delta_rule_states_at(q, k, v, beta, scale, None, counts)

    def fused_fwd_bwd():
        lq, lk, lv, lb = leaves()
        o, after, ht = chunk_delta_rule_states_at(lq, lk, lv, lb, scale, None, counts)
        torch.autograd.backward([o, ht, after], [do, torch.ones_like(ht), torch.ones_like(after)])

    def saved_bytes(forward) -> int:
        """Bytes of the unique storages saved for backward by ``forward`` (inputs included)."""
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            forward(*leaves())
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}.values())

    def unfused_forward(lq, lk, lv, lb):
        o, hs, ht = chunk_delta_rule_with_boundary_states(lq, lk, lv, lb, scale)
        return states_after(hs, ht, lk, lv, lb, counts)

    chunks, _ = position_chunks(counts, T)
    ds0 = torch.randn(B, n, H, D, D, device=dev, generator=gen)
    dv_local = torch.randn_like(v)
    dhb = torch.randn(B, H, NT, D, D, device=dev, generator=gen)
    rows = {
        "fla chunk_delta_rule forward": fla_fwd,
        "fla chunk_delta_rule forward + backward": fla_fwd_bwd,
        "fla recurrence forward (chunk_gated_delta_rule_fwd_h)": lambda: chunk_gated_delta_rule_fwd_h(
            k=k, w=w, u=u, output_final_state=True
        ),
        "ours recurrence forward (boundary states fp32)": lambda: recurrent_forward(k, w, u, None, None),
        "fla recurrence backward (chunk_gated_delta_rule_bwd_dhu)": lambda: chunk_gated_delta_rule_bwd_dhu(
            q=q, k=k, w=w, do=do, dv=dv_local, dht=ht0, scale=scale
        ),
        "ours recurrence backward, final-state gradient only": lambda: recurrent_backward(
            q, k, w, None, do, dv_local, ht0, None, scale, False
        ),
        "ours recurrence backward, + every boundary gradient": lambda: recurrent_backward(
            q, k, w, None, do, dv_local, ht0, dhb, scale, False
        ),
        "for_fla (fp32 [B,H,NT,K,V] -> bf16 [B,NT,H,K,V])": lambda: for_fla(hs0, dt),
        "ours op forward": ours_fwd,
        "ours op forward + backward (o, final)": ours_fwd_bwd,
        "ours op forward + backward + states_after": ours_fwd_bwd_states,
        "states_after alone, forward + backward": states_after_alone,
        "ours recurrence forward, fla layout + position start states": lambda: recurrent_forward(
            k, w, u, None, None, chunks=chunks, fla_layout=True, h_dtype=dt
        ),
        "ours recurrence backward, + sparse position gradients": lambda: recurrent_backward(
            q, k, w, None, do, dv_local, ht0, None, scale, False, chunks=chunks, ds0=ds0
        ),
        "fused states_at forward": fused_fwd,
        "fused states_at forward + backward (o, final, states)": fused_fwd_bwd,
    }
    if dt == torch.float32:  # the CPU smoke run: fla refuses fp32 chunk ops and its recurrences need a GPU
        rows = {name: fn for name, fn in rows.items() if not name.startswith("fla ")}
    res = {}
    for name, fn in rows.items():
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = timed(fn, a.reps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
        res[name] = {"ms": round(ms, 3), "peak_gib": round(peak, 2)}
        print(f"{name:58s} {ms:8.3f} ms  {res[name]['peak_gib']:6.2f} GiB", flush=True)
    out = {
        "shape": {"B": B, "T": T, "H": H, "K": D, "V": D, "positions": n, "dtype": str(dt).split(".")[-1]},
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "fla": fla.__version__},
        "rows": res,
        "saved_bytes_per_layer": {
            "op + states_after": saved_bytes(unfused_forward),
            "fused states_at": saved_bytes(lambda *x: chunk_delta_rule_states_at(*x, scale, None, counts)),
        },
    }
    print(json.dumps(out["saved_bytes_per_layer"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

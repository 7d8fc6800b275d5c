"""States at given positions from one forward of fla's DeltaNet / GatedDeltaNet, with fla's own kernels: *readout
tokens*.

fla's delta-rule kernels return the final state only. A token with ``k = 0``, ``v = 0`` and ``beta = 0`` leaves the
state unchanged (``S += k (beta (v - Sᵀk))ᵀ = 0``), and its output is ``Sᵀ q``: with ``q = c·e_i`` it reads row i
of the state. So K such tokens spliced in right after a position read the whole [K, V] state there, in the same
kernel call as the document, and fla's backward carries their gradient into the prefix (through the outputs, which
the kernels differentiate). The cost is n·K extra tokens per document in the delta-rule op only (8 × 128 = 12.5%
of an 8K document); projections, convolutions, norms and the MLP see the document alone. The conv states at a
position are the last ``conv_size`` projected inputs (fla's cache layout: slot ``W-1`` is the newest).

While `record_position_states` is active, every fla ``DeltaNet`` (``GatedDeltaNet``) layer of the model runs
`_forward_with_readout` (`_gated_forward_with_readout`): fla's layer forward, the same projections and kernels,
plus the readout; it stores its states by layer index. For GatedDeltaNet the readout tokens also get a zero
log-gate (no decay), and its state is V-first ([V, K]: output i reads column i).
The readout states pass through the kernel's output dtype (bf16 in bf16 models: relative ~4e-3, the precision of
fla's own chunk-state staging); in fp32 they are exact to rounding.

The packed layout, the layer's inputs of the delta rule (`delta_net_inputs`), its output (`layer_output`) and the
layer patching are shared with the boundary-state provider (`trl_refine.rollout.fla_boundary`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trl_refine.modeling_utils import unwrap

#: magnitude of the readout queries: l2norm(c·e_i) = e_i / sqrt(1 + eps / c²) is e_i to 1e-12 in the l2 case, and
#: c·e_i is exact in bf16 (a power of two)
READOUT_SCALE = 1024.0


#: fla model types with a readout forward, and the name of their token-mixer class in ``fla.layers``
READOUT_LAYERS = {"delta_net": "DeltaNet", "gated_deltanet": "GatedDeltaNet"}

#: raw gate / beta logits of the readout tokens: softplus and sigmoid of -1e4 are exactly 0 in fp32 (no decay, no
#: write)
_OFF = -1e4


def fla_readout_support(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether every token mixer of ``model`` is fla's ``DeltaNet`` or ``GatedDeltaNet`` layer (the readout path),
    and why not."""
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in READOUT_LAYERS:
        return False, f"model_type {model_type!r} is not one of fla's {', '.join(READOUT_LAYERS)}"
    try:
        import fla.layers
    except ImportError:
        return False, "fla is not installed"
    layer_cls = getattr(fla.layers, READOUT_LAYERS[model_type])
    layers = getattr(getattr(base, "model", None), "layers", None) or []
    if not layers or not all(isinstance(getattr(layer, "attn", None), layer_cls) for layer in layers):
        return False, f"not every layer's token mixer is fla's {layer_cls.__name__} (hybrid models are not supported)"
    return True, ""


@dataclass
class PackedLayout:
    """The valid tokens of left-padded documents packed into one varlen sequence, and the positions as token counts
    (shared by the layers of one forward; every states provider builds on it)."""

    real_flat: torch.Tensor  # [Σ] index of every valid token in the flattened [B·L] input
    cu_seqlens: torch.Tensor  # [B+1] int32, the documents' valid tokens
    counts: torch.Tensor  # [B, n] valid tokens up to and including each position
    doc_offsets: torch.Tensor  # [B] start of each document in the packed valid tokens

    @staticmethod
    def parts(attention_mask: torch.Tensor, positions: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The fields, ``lens`` [B] and ``local`` [B, L] (each token's index among its document's valid tokens,
        which the subclasses' layouts are computed from)."""
        mask = attention_mask.bool()
        lens = mask.sum(-1)
        local = mask.long().cumsum(-1) - 1  # [B, L]
        counts = (local + 1).gather(1, positions)  # [B, n]
        if bool((counts[:, 1:] < counts[:, :-1]).any()) or bool((counts < 1).any()):
            raise ValueError("positions must be non-decreasing along each document and on valid tokens")
        offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        fields = dict(
            real_flat=mask.flatten().nonzero().squeeze(-1),
            cu_seqlens=offsets.to(torch.int32),
            counts=counts,
            doc_offsets=offsets[:-1],
        )
        return fields, lens, local

    def conv_windows(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """The conv caches after each position: the last ``width`` inputs [1, Σ, D] → [B, n, D, W] (zeros before the
        document's first token)."""
        w = torch.arange(width, device=x.device)
        local = self.counts[..., None] - width + w  # [B, n, W]
        index = (self.doc_offsets[:, None, None] + local).clamp(min=0)
        windows = x[0].index_select(0, index.flatten()).view(*local.shape, -1)
        windows = windows * (local >= 0)[..., None].to(windows.dtype)
        return windows.transpose(-1, -2)


@dataclass
class ReadoutLayout(PackedLayout):
    """Where the document tokens and the readout tokens go in the spliced varlen sequence (shared by the layers)."""

    spliced_cu_seqlens: torch.Tensor  # [B+1] int32, each document with its n·K readout tokens
    spliced_cu_seqlens_cpu: torch.Tensor
    real_in_spliced: torch.Tensor  # [Σ] index of every valid token in the spliced sequence
    readout_in_spliced: torch.Tensor  # [B·n·K] index of readout token (b, j, i)
    spliced_len: int

    @classmethod
    def build(cls, attention_mask: torch.Tensor, positions: torch.Tensor, head_k_dim: int) -> ReadoutLayout:
        n = positions.size(1)
        parts, lens, local = PackedLayout.parts(attention_mask, positions)
        counts = parts["counts"]
        spliced_lens = lens + n * head_k_dim
        spliced_offsets = torch.cat([lens.new_zeros(1), spliced_lens.cumsum(0)])
        # token r (0-based among its document's valid tokens) moves right by K for every readout block before it;
        # the block for count c sits after token c-1 (blocks of equal counts in chunk order)
        before = torch.searchsorted(counts.contiguous(), local.contiguous(), right=True)  # blocks with c <= r
        spliced_index = spliced_offsets[:-1, None] + local + head_k_dim * before
        real_in_spliced = spliced_index.flatten().index_select(0, parts["real_flat"])
        j = torch.arange(n, device=positions.device)
        i = torch.arange(head_k_dim, device=positions.device)
        block_start = spliced_offsets[:-1, None] + counts + head_k_dim * j[None, :]  # [B, n]
        readout = (block_start[..., None] + i).flatten()
        spliced_cpu = spliced_offsets.to("cpu", torch.int32)
        return cls(
            **parts,
            spliced_cu_seqlens=spliced_offsets.to(torch.int32),
            spliced_cu_seqlens_cpu=spliced_cpu,
            real_in_spliced=real_in_spliced,
            readout_in_spliced=readout,
            spliced_len=int(spliced_cpu[-1]),
        )

    def splice(self, x: torch.Tensor, readout: torch.Tensor | float | None = None) -> torch.Tensor:
        """[1, Σ, ...] document tokens → [1, Σ', ...] with ``readout`` at the readout tokens: [K, ...] (repeated per
        block), a constant, or zeros."""
        out = x.new_zeros(self.spliced_len, *x.shape[2:])
        out = out.index_copy(0, self.real_in_spliced, x[0])
        if isinstance(readout, float):
            rows = x.new_full((self.readout_in_spliced.numel(), *x.shape[2:]), readout)
            out = out.index_copy(0, self.readout_in_spliced, rows)
        elif readout is not None:
            blocks = self.readout_in_spliced.numel() // readout.size(0)
            out = out.index_copy(0, self.readout_in_spliced, readout.to(x.dtype).repeat(blocks, *[1] * (x.dim() - 2)))
        return out[None]


def check_whole_documents(past_key_values, kwargs) -> None:
    """The position-state forwards run over whole left-padded documents, never from a cache."""
    if past_key_values is not None or kwargs.get("cu_seqlens") is not None:
        raise ValueError("the position-state forward runs over whole documents: no cache, no cu_seqlens")


def packed_input(hidden_states: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """[B, L, D] left-padded hidden states → [1, Σ, D], the documents' valid tokens packed."""
    return hidden_states.reshape(-1, hidden_states.size(-1)).index_select(0, layout.real_flat)[None]


def delta_net_inputs(attn, x: torch.Tensor, layout: PackedLayout, conv_inputs: bool = False):
    """fla ``DeltaNet.forward``'s (fla/layers/delta_net.py, 0.6.0) inputs of the delta rule over the packed documents
    ``x`` [1, Σ, D]: q, k [1, Σ, H, K] (before the l2 norm, which fla applies in the kernel), v [1, Σ, H, V], beta
    [1, Σ, H], and the conv caches at the layout's positions (None without short convs); ``conv_inputs``: instead
    of those caches, the convs' inputs (q, k, v projections [1, Σ, D]), for positions chosen later."""
    from einops import rearrange
    from fla.layers.delta_net import elu_p1, sum_norm

    conv_states = None
    if attn.use_short_conv:
        q, k, v, conv_states = _short_convs(attn, x, layout, conv_inputs)
    else:
        q, k = attn.q_proj(x), attn.k_proj(x)
        if attn.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        v = F.silu(attn.v_proj(x))
    q, k = (rearrange(t, "... (h d) -> ... h d", d=attn.head_k_dim) for t in (q, k))
    v = rearrange(v, "... (h d) -> ... h d", d=attn.head_v_dim)
    if attn.qk_activation != "silu":
        if attn.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif attn.qk_activation == "elu":
            q, k = elu_p1(q), elu_p1(k)
        elif attn.qk_activation != "identity":
            raise NotImplementedError(attn.qk_activation)
    if attn.qk_norm == "sum":
        q, k = sum_norm(q).to(q), sum_norm(k).to(k)
    beta = attn.b_proj(x).sigmoid() if attn.use_beta else torch.ones_like(q[..., 0])
    if attn.allow_neg_eigval:
        beta = beta * 2.0
    return q, k, v, beta, conv_states


def _forward_with_readout(
    attn, layout: ReadoutLayout, store: dict, hidden_states, attention_mask=None, past_key_values=None, **kwargs
):
    """fla's ``DeltaNet.forward`` (fla/layers/delta_net.py, 0.6.0) for a cache-free call over left-padded documents,
    plus the readout of the states after ``layout``'s positions into ``store[layer_idx]``."""
    from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule

    check_whole_documents(past_key_values, kwargs)
    bsz, q_len, _ = hidden_states.shape
    mode = "fused_recurrent" if q_len <= 64 else attn.mode
    x = packed_input(hidden_states, layout)
    q, k, v, beta, conv_states = delta_net_inputs(attn, x, layout)

    num_heads, dk = q.shape[-2], attn.head_k_dim
    eye = torch.eye(dk, device=q.device)[:, None, :].expand(dk, num_heads, dk) * READOUT_SCALE  # [K(i), H, K]
    args = dict(
        q=layout.splice(q, eye),
        k=layout.splice(k),
        v=layout.splice(v),
        beta=layout.splice(beta),
        output_final_state=False,
        cu_seqlens=layout.spliced_cu_seqlens,
        use_qk_l2norm_in_kernel=(attn.qk_norm == "l2"),
    )
    if mode == "chunk":
        o, _ = chunk_delta_rule(**args, cu_seqlens_cpu=layout.spliced_cu_seqlens_cpu)
    elif mode == "fused_recurrent":
        o, _ = fused_recurrent_delta_rule(**args)
    else:
        raise NotImplementedError(f"mode {mode!r}")
    # the kernels scale q by K^-0.5; an l2-normalised readout query is e_i, otherwise c·e_i
    factor = dk**-0.5 * (1.0 if attn.qk_norm == "l2" else READOUT_SCALE)
    n = layout.counts.size(1)
    readout = o[0].index_select(0, layout.readout_in_spliced).view(bsz, n, dk, num_heads, -1)
    store[attn.layer_idx] = {
        "recurrent_state": readout.transpose(2, 3).float() / factor,  # [B, n, H, K, V]: row i of each state
        "attn_state": None,
        "conv_state": conv_states,
        "ffn_state": None,
    }
    return layer_output(attn, o[:, layout.real_in_spliced], x, layout, bsz, q_len), None, past_key_values


def _short_convs(attn, x: torch.Tensor, layout: PackedLayout, conv_inputs: bool = False):
    """q, k, v through the layer's short convolutions over the packed documents, and the conv caches at the
    positions (the pre-conv inputs; with ``conv_inputs`` those inputs themselves)."""
    xq, xk, xv = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    width = attn.q_conv1d.kernel_size[0]
    if conv_inputs:
        conv_states = (xq, xk, xv)
    else:
        conv_states = tuple(layout.conv_windows(p, width) for p in (xq, xk, xv))
    cu = layout.cu_seqlens
    q, _ = attn.q_conv1d(x=xq, cache=None, output_final_state=False, cu_seqlens=cu)
    k, _ = attn.k_conv1d(x=xk, cache=None, output_final_state=False, cu_seqlens=cu)
    v, _ = attn.v_conv1d(x=xv, cache=None, output_final_state=False, cu_seqlens=cu)
    return q, k, v, conv_states


def layer_output(attn, o: torch.Tensor, x: torch.Tensor, layout: PackedLayout, bsz: int, q_len: int) -> torch.Tensor:
    """The layer's output norm (gated or not) and projection, scattered back to the padded [B, L, D] layout."""
    from einops import rearrange

    if attn.use_gate:
        g = rearrange(attn.g_proj(x), "... (h d) -> ... h d", d=attn.head_v_dim)
        o = attn.o_norm(o, g)
    else:
        o = attn.o_norm(o)
    o = attn.o_proj(rearrange(o, "b t h d -> b t (h d)"))
    return o.new_zeros(bsz * q_len, o.size(-1)).index_copy(0, layout.real_flat, o[0]).view(bsz, q_len, -1)


def gated_delta_net_qkv(attn, x: torch.Tensor, layout: PackedLayout, conv_inputs: bool = False):
    """fla ``GatedDeltaNet.forward``'s (fla/layers/gated_deltanet.py, 0.6.0) q, k [1, Σ, H, K] and v [1, Σ, HV, V]
    over the packed documents ``x`` (before the in-kernel l2 norm), and the conv caches at the layout's positions
    (None without short convs; ``conv_inputs``: the convs' inputs instead, as `delta_net_inputs`)."""
    from einops import rearrange

    conv_states = None
    if attn.use_short_conv:
        q, k, v, conv_states = _short_convs(attn, x, layout, conv_inputs)
    else:
        q, k, v = (F.silu(proj(x)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = (rearrange(t, "... (h d) -> ... h d", d=attn.head_k_dim) for t in (q, k))
    v = rearrange(v, "... (h d) -> ... h d", d=attn.head_v_dim)
    return q, k, v, conv_states


def _gated_forward_with_readout(
    attn, layout: ReadoutLayout, store: dict, hidden_states, attention_mask=None, past_key_values=None, **kwargs
):
    """fla's ``GatedDeltaNet.forward`` (fla/layers/gated_deltanet.py, 0.6.0) for a cache-free call over left-padded
    documents, plus the readout: the readout tokens get a gate logit and a beta logit of -1e4 (no decay, no write;
    the kernel applies softplus and sigmoid) and ``k = 0``; the state is V-first, so output i is column i."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    check_whole_documents(past_key_values, kwargs)
    bsz, q_len, _ = hidden_states.shape
    if torch.is_grad_enabled():
        mode = "chunk"
    elif q_len <= 64 and not attn.training:
        mode = "fused_recurrent"
    else:
        mode = attn.mode
    x = packed_input(hidden_states, layout)
    q, k, v, conv_states = gated_delta_net_qkv(attn, x, layout)

    num_heads, dk = q.shape[-2], attn.head_k_dim
    eye = torch.eye(dk, device=q.device)[:, None, :].expand(dk, num_heads, dk) * READOUT_SCALE
    args = dict(
        q=layout.splice(q, eye),
        k=layout.splice(k),
        v=layout.splice(v),
        g=layout.splice(attn.a_proj(x), _OFF),
        beta=layout.splice(attn.b_proj(x), _OFF),
        output_final_state=False,
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        A_log=attn.A_log,
        dt_bias=attn.dt_bias,
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=attn.allow_neg_eigval,
        state_v_first=True,
        cu_seqlens=layout.spliced_cu_seqlens,
    )
    if mode == "chunk":
        o, _ = chunk_gated_delta_rule(**args, cu_seqlens_cpu=layout.spliced_cu_seqlens_cpu)
    elif mode == "fused_recurrent":
        o, _ = fused_recurrent_gated_delta_rule(**args)
    else:
        raise NotImplementedError(f"mode {mode!r}")
    n = layout.counts.size(1)
    readout = o[0].index_select(0, layout.readout_in_spliced).view(bsz, n, dk, o.size(-2), -1)  # [B, n, K, HV, V]
    store[attn.layer_idx] = {
        "recurrent_state": readout.permute(0, 1, 3, 4, 2).float() / dk**-0.5,  # [B, n, HV, V, K]: column i
        "attn_state": None,
        "conv_state": conv_states,
        "ffn_state": None,
    }
    return layer_output(attn, o[:, layout.real_in_spliced], x, layout, bsz, q_len), None, past_key_values


@contextmanager
def patch_layers(model: torch.nn.Module, layer_forward):
    """While active, every layer's token mixer of ``model`` runs ``layer_forward(attn, *args, **kwargs)`` instead of
    its own forward."""
    patched = []
    try:
        for layer in unwrap(model).model.layers:
            attn = layer.attn

            def forward(*args, _attn=attn, **kwargs):
                return layer_forward(_attn, *args, **kwargs)

            attn.forward = forward
            patched.append(attn)
        yield
    finally:
        for attn in patched:
            del attn.forward


@contextmanager
def record_position_states(model: torch.nn.Module, attention_mask: torch.Tensor, positions: torch.Tensor):
    """While active, a forward of ``model`` (fla DeltaNet / GatedDeltaNet, whole left-padded documents, no cache) also
    fills the yielded dict with every layer's states after ``positions`` [B, n] (fla's cache layout, a chunk dim
    after the batch dim)."""
    base = unwrap(model)
    layout = ReadoutLayout.build(attention_mask, positions, base.model.layers[0].attn.head_k_dim)
    readout_forward = (
        _gated_forward_with_readout if base.config.model_type == "gated_deltanet" else _forward_with_readout
    )
    store: dict[int, dict[str, Any]] = {}
    with patch_layers(model, lambda attn, *args, **kwargs: readout_forward(attn, layout, store, *args, **kwargs)):
        yield store

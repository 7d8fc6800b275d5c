"""TRL drift: our compatibility layer must fail loudly, and TRL's loss must still ask us for log-probs."""

import pytest

from trl_refine import _compat


def test_current_trl_passes():
    _compat.check_trl_api()


def test_signature_drift_fails_loudly(monkeypatch):
    def changed(self, model, batch, extra):  # renamed parameter
        return None

    monkeypatch.setattr(_compat.GRPOTrainer, "_compute_loss", changed)
    with pytest.raises(_compat.TRLCompatibilityError, match="supports trl .*_compute_loss"):
        _compat.check_trl_api()


def test_missing_method_fails_loudly(monkeypatch):
    monkeypatch.delattr(_compat.GRPOTrainer, "_calculate_rewards")
    with pytest.raises(_compat.TRLCompatibilityError, match="_calculate_rewards is missing"):
        _compat.check_trl_api()


def test_compute_loss_reads_our_log_probs(tmp_path, byte_tokenizer):
    """Contract: GRPOTrainer._compute_loss obtains log-probs via _get_per_token_logps_and_entropies."""
    import torch
    from conftest import documents, small_config, tiny_llama
    from datasets import Dataset

    from trl_refine import NSPGRPOTrainer

    tr = NSPGRPOTrainer(
        tiny_llama(),
        args=small_config(tmp_path),
        train_dataset=Dataset.from_dict({"text": documents(2)}),
        processing_class=byte_tokenizer,
    )
    tr.current_gradient_accumulation_steps = 1
    r, k = 4, 5
    logps = torch.zeros(r, k, requires_grad=True)
    tr._nsp_precomputed = (logps, torch.zeros(r, k))
    inputs = {
        "prompt_ids": torch.zeros(r, 0, dtype=torch.long),
        "prompt_mask": torch.zeros(r, 0, dtype=torch.long),
        "completion_ids": torch.zeros(r, k, dtype=torch.long),
        "completion_mask": torch.ones(r, k, dtype=torch.long),
        "advantages": torch.tensor([1.0, -1.0, 2.0, 0.0]),
        "old_per_token_logps": torch.zeros(r, k),
        "num_items_in_batch": torch.tensor(float(r * k)),
    }
    tr.model.train()
    loss = tr._compute_loss(tr.model, inputs)
    loss.backward()
    assert logps.grad is not None and logps.grad.abs().sum() > 0
    assert tr._nsp_precomputed is not None  # consumed only by our compute_loss wrapper


def test_transformers_torch_kernels_drift():
    """transformers' kernel decorator keeps the PyTorch reference as ``__wrapped__``: after the switch the module
    calls its own torch functions (what the CPU hybrid tests rely on)."""
    import importlib

    module = importlib.import_module("transformers.models.qwen3_next.modeling_qwen3_next")
    _compat.use_transformers_torch_kernels("qwen3_next")
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn"):
        fn = getattr(module, name)
        assert fn.__module__ == module.__name__ and not hasattr(fn, "__wrapped__"), name


def test_private_transformers_accelerate_torch_names_are_present():
    _compat.check_private_api()


@pytest.mark.parametrize(
    "owner, name",
    [
        ("transformers.Trainer", "_clip_grad_norm"),
        ("transformers.Trainer", "_defer_fsdp_gradient_reduction"),
        ("accelerate.state.GradientState", "_set_sync_gradients"),
        ("torch.distributed.fsdp.FSDPModule", "_get_fsdp_state"),
        ("transformers.PreTrainedConfig", "_attn_implementation"),
        ("torch.utils._pytree", "tree_flatten"),
        ("transformers.models.kimi_linear.modeling_kimi_linear.KimiLinearAttention", "expand_kv"),
        ("transformers.models.mamba.modeling_mamba.MambaMixer", "forward"),
    ],
)
def test_private_name_drift_fails_loudly(monkeypatch, owner, name):
    import importlib

    if owner.endswith("_pytree"):  # a module's function, not a class's
        monkeypatch.delattr(importlib.import_module(owner), name)
    else:
        module, _, cls = owner.rpartition(".")
        monkeypatch.delattr(getattr(importlib.import_module(module), cls), name)
    with pytest.raises(_compat.PrivateAPIDrift, match=name):
        _compat.check_private_api()


def test_no_private_framework_names_outside_compat():
    """Private names of TRL / transformers / accelerate / torch are used in trl_refine/_compat.py only."""
    import re
    from pathlib import Path

    root = Path(_compat.__file__).parent
    pattern = re.compile(
        r"\.(_clip_grad_norm|_defer_fsdp_gradient_reduction|_set_sync_gradients|_get_fsdp_state|_fsdp_param_groups?|"
        r"_auto_reshard_after_forward|_training_state|_attn_implementation|expand_kv)\b|_fully_shard|_pytree|"
        r"from trl\.trainer\.grpo_trainer"
    )
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "_compat.py" and pattern.search(path.read_text())
    ]
    assert not offenders, offenders


def test_attn_implementation_switch_reaches_the_attention_layers():
    """Setting ``config._attn_implementation`` through _compat changes the function transformers' attention layers
    call at the next forward (what the hybrids' shared-prefix attention relies on), and reads back."""
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from trl_refine.models.tiny_configs import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("lfm2", vocab_size=32, hidden_size=32)).eval()
    seen = []

    def spy(*args, **kwargs):
        seen.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("trl_refine_test_spy", spy)
    AttentionMaskInterface.register("trl_refine_test_spy", sdpa_mask)
    original = _compat.attn_implementation(model)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        _compat.set_attn_implementation(model, "trl_refine_test_spy")
        assert _compat.attn_implementation(model) == "trl_refine_test_spy"
        out = model(input_ids=ids).logits
    _compat.set_attn_implementation(model, original)
    assert seen and torch.allclose(out, ref, atol=1e-6)


def test_mla_expansion_drift_fails_loudly(monkeypatch):
    """kimi_linear's MLA forward must still expand (expand_kv) the latents the cache update returns."""
    import inspect

    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearAttention

    source = inspect.getsource(KimiLinearAttention.forward)
    monkeypatch.setattr(inspect, "getsource", lambda obj: source.replace("self.expand_kv(kv_nope, k_rot)", "..."))
    with pytest.raises(_compat.PrivateAPIDrift, match="no longer expands"):
        _compat.check_private_api()


def test_mla_expand_kv_wrap_reaches_the_layer_and_is_undone():
    """The wrapped expansion is what the MLA forward calls, and the layer's own method is back on exit."""
    import torch
    from transformers import AutoModelForCausalLM

    from trl_refine.models.tiny_configs import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("kimi_linear", vocab_size=32, hidden_size=32)).eval()
    seen = []

    def wrap(expand):
        def run(a, b):
            seen.append(a.shape)
            return expand(a, b)

        return run

    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with _compat.mla_expand_kv_wrapped(model, wrap) as layers:
            wrapped = model(input_ids=ids).logits
        assert len(layers) == len(seen) == 1 and seen[0][-2] == 3
        model(input_ids=ids)
    assert len(seen) == 1 and all("expand_kv" not in vars(m) for m in layers)
    assert torch.equal(reference, wrapped)


def test_mamba_mixer_attribute_drift_fails_loudly(monkeypatch):
    """The continuing Mamba mixer reads the attributes MambaMixer.__init__ sets; one that is no longer set fails."""
    import inspect

    init, getsource = _compat.mamba_mixer_class().__init__, inspect.getsource
    drifted = getsource(init).replace("self.x_proj =", "self.xproj =")
    monkeypatch.setattr(inspect, "getsource", lambda obj: drifted if obj is init else getsource(obj))
    with pytest.raises(_compat.PrivateAPIDrift, match="x_proj"):
        _compat.check_private_api()


def test_continuing_mamba_mixer_matches_transformers():
    """The snapshot engine's Mamba mixer (`continuing_mixer_class`) reproduces transformers' own MambaMixer: a sequence
    run in three calls, each continuing the engine cache (one of them a single token), gives transformers' outputs
    on the whole sequence, and the final SSM state equals the one transformers' cache holds after it."""
    import torch
    from transformers import AutoModelForCausalLM

    from trl_refine.models.tiny_configs import tiny_config
    from trl_refine.rollout.adapters.transformers_mamba import TransformersMambaStateAdapter

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("transformers_mamba", vocab_size=32, hidden_size=32)).eval()
    ids = torch.randint(2, 32, (2, 13))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=True)
        adapter = TransformersMambaStateAdapter(model.config)
        adapter.prepare(model)
        assert all(type(m) is not _compat.mamba_mixer_class() for m in model.modules())
        cache, logits = adapter.empty_cache(), []
        for part in (ids[:, :6], ids[:, 6:7], ids[:, 7:]):
            out = model(input_ids=part, cache_params=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.cache_params
    assert torch.allclose(torch.cat(logits, 1), reference.logits, atol=1e-5, rtol=1e-5)
    for layer in range(model.config.num_hidden_layers):
        ours = cache.get_recurrent_state(layer, state_idx=0)
        theirs = reference.cache_params.get_recurrent_state(layer, state_idx=0)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)

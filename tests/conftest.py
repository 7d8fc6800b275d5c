import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message="Triton is not supported")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def byte_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def tiny_llama(seed: int = 0, vocab: int = 384):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg).float()


def tiny_fla_config(kind: str = "delta_net", **kw):
    """A small flash-linear-attention config (``delta_net`` or ``gated_deltanet``): hidden 128, 2 layers, 2 heads.
    The GPU parity tests and the GPU distributed scenarios share it, so they share fla's Triton autotuning too."""
    base = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_heads=2, intermediate_size=256)
    base.update(kw)
    if kind == "delta_net":
        from fla.models import DeltaNetConfig

        return DeltaNetConfig(**base)
    from fla.models import GatedDeltaNetConfig

    base.pop("num_heads")
    return GatedDeltaNetConfig(num_heads=2, head_dim=64, **base)


def tiny_delta_net(seed: int = 0, vocab: int = 384):
    from trl_refine.models.delta_net import RefDeltaNetConfig, RefDeltaNetForCausalLM

    torch.manual_seed(seed)
    cfg = RefDeltaNetConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64, attn_mode="chunk"
    )
    return RefDeltaNetForCausalLM(cfg).float()


def documents(num: int = 8, base: int = 3):
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "judge",
        "boxing",
    ]
    out = []
    for i in range(num):
        g = torch.Generator().manual_seed(i)
        idx = torch.randint(len(words), (40 * (base + i % 3),), generator=g).tolist()
        out.append(" ".join(words[j] for j in idx))
    return out


def small_config(tmp_path, config_class=None, **overrides):
    """A fast CPU config (NSPGRPOConfig, or ``config_class`` such as PostTrainConfig)."""
    from trl_refine import NSPGRPOConfig

    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        nsp_num_chunks=4,
        nsp_margin=8,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return (config_class or NSPGRPOConfig)(**kwargs)

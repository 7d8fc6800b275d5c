"""What a TRL user does first: `model=` as a path for every family, GRPO options refused with the fix, reward names,
checkpoints that load with plain transformers (with and without trl_refine), and the model card."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import documents, small_config, tiny_delta_net, tiny_fla_config
from datasets import Dataset

from trl_refine import NSPGRPOConfig, NSPGRPOTrainer
from trl_refine.rewards import cosine_reward, exact_match_reward, hybrid_reward


def tiny_lact():
    from trl_refine.models.lact import LaCTConfig, LaCTForCausalLM

    torch.manual_seed(0)
    cfg = LaCTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attn_heads=2,
        num_lact_heads=2,
        lact_chunk_size=16,
        window_size=16,
        vocab_size=384,
        intermediate_size=48,
        muon_dtype="float32",
    )
    return LaCTForCausalLM(cfg).float()


def tiny_fla_delta_net():
    from fla.models import DeltaNetForCausalLM

    torch.manual_seed(0)
    return DeltaNetForCausalLM(tiny_fla_config(vocab_size=384, hidden_size=32, intermediate_size=64)).float()


FAMILIES = {"refine_delta_net": tiny_delta_net, "lact_swiglu": tiny_lact, "fla_delta_net": tiny_fla_delta_net}


def save_family(family, path, tok):
    model = FAMILIES[family]()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_as_a_local_path_for_every_family(tmp_path, byte_tokenizer, family):
    saved = save_family(family, tmp_path / "ckpt", byte_tokenizer)
    # fla's Triton kernels do not run on CPU: the exact reward needs no forward pass at construction
    args = small_config(tmp_path, nsp_reward="exact" if family == "fla_delta_net" else "cosine")
    trainer = NSPGRPOTrainer(
        model=str(tmp_path / "ckpt"), args=args, train_dataset=Dataset.from_dict({"text": documents(4)})
    )
    assert type(trainer.model) is type(saved)
    assert trainer.model.config._name_or_path == str(tmp_path / "ckpt")
    for (name, p), q in zip(trainer.model.named_parameters(), saved.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    assert args.model_init_kwargs is None  # restored after loading


def test_model_path_trains_and_honours_model_init_kwargs(tmp_path, byte_tokenizer):
    save_family("refine_delta_net", tmp_path / "ckpt", byte_tokenizer)
    args = small_config(tmp_path, max_steps=1, model_init_kwargs={"dtype": "float32"})
    ds = Dataset.from_dict({"text": documents(4)})
    trainer = NSPGRPOTrainer(model=str(tmp_path / "ckpt"), args=args, train_dataset=ds)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.model.parameters()))
    assert args.model_init_kwargs == {"dtype": "float32"}


def test_unknown_model_type_names_the_fix(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "not_a_real_type"}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        NSPGRPOTrainer(
            model=str(tmp_path / "ckpt"), args=small_config(tmp_path), train_dataset=Dataset.from_dict({"text": ["x"]})
        )


@pytest.mark.parametrize(
    "option",
    [
        {"beta": 0.04},
        {"top_p": 0.9},
        {"top_k": 50},
        {"min_p": 0.1},
        {"repetition_penalty": 1.1},
        {"generation_kwargs": {"do_sample": False}},
    ],
)
def test_unsupported_grpo_options_fail_at_construction(tmp_path, option):
    (name,) = option
    with pytest.raises(ValueError, match=f"{name}=.*Set {name}=|{name}=.*set {name}="):
        small_config(tmp_path, **option)


@pytest.mark.parametrize(
    "names, expected",
    [
        (["cosine"], [cosine_reward]),
        ("exact", exact_match_reward),
        (["hybrid"], [hybrid_reward]),
        (["cosine", "exact_match"], [cosine_reward, exact_match_reward]),
    ],
)
def test_builtin_reward_names(tmp_path, byte_tokenizer, names, expected):
    trainer = NSPGRPOTrainer(
        tiny_delta_net(),
        reward_funcs=names,
        args=small_config(tmp_path),
        train_dataset=Dataset.from_dict({"text": documents(4)}),
        processing_class=byte_tokenizer,
    )
    assert trainer.reward_funcs == (expected if isinstance(expected, list) else [expected])


def test_unknown_reward_name_is_refused_offline(tmp_path, byte_tokenizer, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("went to the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(ValueError, match="not a built-in reward"):
        NSPGRPOTrainer(
            tiny_delta_net(),
            reward_funcs=["org/some-reward-model"],
            args=small_config(tmp_path),
            train_dataset=Dataset.from_dict({"text": documents(4)}),
            processing_class=byte_tokenizer,
        )


LOAD_WITHOUT_PACKAGE = """
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.arange(3, 40)[None]
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    torch.save(model(ids).logits, path + "/logits.pt")
assert "trl_refine" not in sys.modules, "trl_refine was imported"
print("ok")
"""


def test_checkpoints_load_anywhere_with_trust_remote_code(tmp_path, byte_tokenizer):
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 40)[None]
    expected = {}
    for family in ("refine_delta_net", "lact_swiglu"):
        path = tmp_path / family
        model = save_family(family, path, byte_tokenizer).eval()
        assert "AutoModelForCausalLM" in json.loads((path / "config.json").read_text())["auto_map"]
        assert any(f.startswith("modeling_") for f in os.listdir(path))
        # after `import trl_refine` plain from_pretrained works (no trust_remote_code)
        reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
        assert type(reloaded) is type(model)
        with torch.no_grad():
            expected[family] = model(ids).logits
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    out = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, *(str(tmp_path / f) for f in expected)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for family, logits in expected.items():
        torch.testing.assert_close(torch.load(tmp_path / family / "logits.pt"), logits)


def test_model_card_names_base_model_quick_start_and_refine(tmp_path, byte_tokenizer):
    save_family("refine_delta_net", tmp_path / "base", byte_tokenizer)
    args = small_config(tmp_path)
    trainer = NSPGRPOTrainer(
        model=str(tmp_path / "base"), args=args, train_dataset=Dataset.from_dict({"text": documents(4)})
    )
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(tmp_path / "base") in card
    assert "import trl_refine" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "2602.16704" in card and "Reinforced Fast Weights with Next-Sequence Prediction" in card
    assert "None" not in card.split("## Quick start")[0]

    random_args = small_config(tmp_path / "r")
    trainer = NSPGRPOTrainer(
        tiny_delta_net(),
        args=random_args,
        train_dataset=Dataset.from_dict({"text": documents(4)}),
        processing_class=byte_tokenizer,
    )
    trainer.create_model_card()
    assert "randomly initialised `refine_delta_net`" in (tmp_path / "r" / "out" / "README.md").read_text()


def test_config_defaults_still_build():
    NSPGRPOConfig(output_dir="unused", use_cpu=True, bf16=False)


def test_recipes_push_to_hub_with_the_model_card(tmp_path, byte_tokenizer, monkeypatch):
    """`--push_to_hub` in a recipe: save_and_publish saves the model, tokenizer and our card, then uploads the folder
    (the Hub client is replaced by a recorder: nothing leaves the machine)."""
    from types import SimpleNamespace

    import transformers.trainer

    from trl_refine.recipe_utils import save_and_publish

    calls = []

    class RecordingHub:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: RecordingHub())
    args = small_config(tmp_path, push_to_hub=True, hub_model_id="me/refine-tiny")
    trainer = NSPGRPOTrainer(
        tiny_delta_net(),
        args=args,
        train_dataset=Dataset.from_dict({"text": documents(4)}),
        processing_class=byte_tokenizer,
    )
    out = save_and_publish(trainer, byte_tokenizer, dataset_name="synthetic")
    assert calls[0] == ("create_repo", "me/refine-tiny")
    name, repo, files = calls[-1]
    assert name == "upload_folder" and repo == "me/refine-tiny"
    assert {"README.md", "config.json", "model.safetensors", "modeling_delta_net.py", "tokenizer_config.json"} <= set(
        files
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert os.path.samefile(out, tmp_path / "out")
    assert 'from_pretrained("me/refine-tiny")' in card and "synthetic" in card

"""The model card written next to checkpoints: the real base model, a quick start that loads it, the ReFINE citation.

TRL's own card names no base model for local checkpoints or models built from a config, and its quick start
(`pipeline("text-generation", ...)`) fails for our model types unless their package is imported first.
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.metadata import version

from huggingface_hub import ModelCard, ModelCardData

REFINE_CITATION = """@article{hwang2026refine,
  title   = {Reinforced Fast Weights with Next-Sequence Prediction},
  author  = {Hwang, Hee Seung and Wu, Xindi and Chun, Sanghyuk and Russakovsky, Olga},
  journal = {arXiv preprint arXiv:2602.16704},
  year    = {2026}
}"""


def _register_import(model) -> tuple[str, str, bool]:
    """The import that registers the model's type, the extra load kwargs, and whether its code ships with it."""
    module = type(model).__module__
    if module.startswith("trl_refine."):
        return "import trl_refine  # registers the model type (or pass trust_remote_code=True)", "", True
    if module.startswith("fla."):
        return "import fla  # flash-linear-attention registers its model types", "", False
    if module.startswith("transformers."):
        return "", "", False
    return f"import {module.split('.')[0]}  # the package that defines {type(model).__name__}", "", False


def build_model_card(
    model,
    *,
    model_name: str,
    hub_model_id: str | None,
    output_dir: str,
    trainer_name: str,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    wandb_url: str | None = None,
    trackio_url: str | None = None,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for a trained model (``model`` unwrapped, PEFT models included)."""
    config = getattr(model, "config", None)
    base_model = getattr(config, "_name_or_path", "") or None
    if base_model and os.path.abspath(base_model) == os.path.abspath(output_dir):
        base_model = None  # the model was reloaded from its own output directory
    base_model_hub = bool(base_model) and not os.path.exists(base_model)
    register_import, load_kwargs, remote_code = _register_import(model)
    card_data = ModelCardData(
        base_model=base_model if base_model_hub else None,
        library_name="transformers",
        licence="license",
        model_name=model_name,
        tags=["generated_from_trainer", *(tags or [])],
    )
    template = resources.files("trl_refine").joinpath("templates/model_card.md")
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        base_model=base_model,
        base_model_hub=base_model_hub,
        model_type=getattr(config, "model_type", type(model).__name__),
        dataset_name=dataset_name,
        model_path=hub_model_id or output_dir,
        register_import=register_import,
        load_kwargs=load_kwargs,
        remote_code=remote_code,
        wandb_url=wandb_url,
        trackio_url=trackio_url,
        trainer_name=trainer_name,
        refine_citation=REFINE_CITATION,
        trl_refine_version=version("trl-refine") if _installed("trl-refine") else "dev",
        trl_version=version("trl"),
        transformers_version=version("transformers"),
        pytorch_version=version("torch"),
    )


def _installed(dist: str) -> bool:
    try:
        version(dist)
    except Exception:
        return False
    return True

"""``trl-refine midtrain|posttrain|testtime [options]``: the recipes as an installed command.

Every recipe takes ``--config x.yaml`` and the options of its argument classes (TRL's ``ModelConfig`` and
``ScriptArguments`` with the recipe's additions, and the trainer config). Multi-GPU: ``accelerate launch -m
trl_refine posttrain ...`` (or ``accelerate launch $(which trl-refine) posttrain ...``).
"""

from __future__ import annotations

import importlib
import sys

RECIPES = {
    "midtrain": "ReFINE on raw long documents (mid-training)",
    "posttrain": "evaluate, post-train on prompt/answer data, evaluate again, save (the main job)",
    "testtime": "test-time training and evaluation",
}

USAGE = "usage: trl-refine {midtrain,posttrain,testtime} [--config x.yaml] [options]\n\n" + "\n".join(
    f"  {name:<10} {what}" for name, what in RECIPES.items()
)


def main(argv: list[str] | None = None) -> str | None:
    """Run a recipe; returns what the recipe's ``main`` returns (its output directory)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n`trl-refine <command> --help` lists a command's options.")
        return None
    command, rest = argv[0], argv[1:]
    if command not in RECIPES:
        raise SystemExit(f"trl-refine: unknown command {command!r}\n\n{USAGE}")
    recipe = importlib.import_module(f"trl_refine.recipes.{command}")
    return recipe.main(rest)


if __name__ == "__main__":
    main()

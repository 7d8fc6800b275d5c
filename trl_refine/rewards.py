"""Built-in ReFINE rewards, with TRL's reward-function signature.

Every reward function is called as ``f(prompts, completions, completion_ids, **kwargs)`` and returns one float per
rollout. Besides TRL's own keyword arguments, NSPGRPOTrainer passes, per rollout (as lists):

* ``prefix_ids``: the full prefix token ids (``prompts`` holds only its decoded tail, see ``nsp_prompt_tail_tokens``),
* ``ground_truth_ids`` / ``ground_truth_text``: the k true next tokens and their text,
* ``rollout_hidden_states`` / ``ground_truth_hidden_states``: [k, H] last-layer hidden states (detached),
* ``prefix_position``, ``chunk_index``, ``document_index``, and every column of the source dataset row.

User callables should accept ``**kwargs`` and pick what they need. The hidden states are None when no reward needs
them (the built-in exact reward alone: the engines then skip the decoding step that only computes them) or when a
custom reward is used with a model that cannot provide them; mark a callable ``fn.needs_hidden_states = True`` to
make that an error at construction instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def _stack(values: Sequence) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    return torch.stack([v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in values])


def cosine_scores(rollout_hidden: torch.Tensor, truth_hidden: torch.Tensor) -> torch.Tensor:
    """[R] mean over the k positions of cos(ĥ_i, h*_i), computed in fp32."""
    return F.cosine_similarity(rollout_hidden.float(), truth_hidden.float(), dim=-1, eps=1e-8).mean(-1)


def exact_scores(completion_ids: torch.Tensor, truth_ids: torch.Tensor) -> torch.Tensor:
    """[R] fraction of the k rollout tokens equal to the ground truth (not all-or-nothing)."""
    return (completion_ids == truth_ids).float().mean(-1)


def cosine_reward(prompts, completions, completion_ids, rollout_hidden_states, ground_truth_hidden_states, **kwargs):
    """Mean cosine similarity between the rollout's and the ground truth's last-layer hidden states."""
    scores = cosine_scores(_stack(rollout_hidden_states), _stack(ground_truth_hidden_states))
    return scores.tolist()


def exact_match_reward(prompts, completions, completion_ids, ground_truth_ids, **kwargs):
    """Fraction of rollout tokens that equal the ground-truth tokens."""
    truth = _stack(ground_truth_ids)
    scores = exact_scores(_stack([torch.as_tensor(c) for c in completion_ids]).to(truth.device), truth)
    return scores.tolist()


def hybrid_reward(prompts, completions, completion_ids, **kwargs):
    """cosine + exact (the official ``hybrid``) as one function."""
    cos = cosine_reward(prompts, completions, completion_ids, **kwargs)
    ex = exact_match_reward(prompts, completions, completion_ids, **kwargs)
    return [c + e for c, e in zip(cos, ex)]


cosine_reward.__name__ = "cosine"
exact_match_reward.__name__ = "exact_match"
hybrid_reward.__name__ = "hybrid"


def builtin_reward_funcs(name: str) -> tuple[list[Callable], list[float]]:
    """Reward functions and weights for ``NSPGRPOConfig.nsp_reward``.

    ``hybrid`` is returned as the two functions cosine and exact with weights 1 and 1: TRL sums weighted rewards
    before the group normalisation, so this equals the official ``cosine + exact`` and logs each part separately.
    """
    if name == "cosine":
        return [cosine_reward], [1.0]
    if name == "exact":
        return [exact_match_reward], [1.0]
    if name == "hybrid":
        return [cosine_reward, exact_match_reward], [1.0, 1.0]
    raise ValueError(f"unknown built-in reward {name!r}; expected cosine, exact or hybrid")


def needs_hidden_states(reward_funcs: Sequence) -> bool:
    """Whether some reward must get hidden states: the built-in cosine / hybrid rewards, and any callable marked
    ``fn.needs_hidden_states = True`` (then a model that cannot provide them fails at construction)."""
    return any(f in (cosine_reward, hybrid_reward) or getattr(f, "needs_hidden_states", False) for f in reward_funcs)


def has_custom_rewards(reward_funcs: Sequence) -> bool:
    """Whether a reward is not one of the built-ins (it gets hidden states whenever the model provides them)."""
    return any(f not in (cosine_reward, hybrid_reward, exact_match_reward) for f in reward_funcs)


#: names accepted in ``reward_funcs`` for the built-in rewards
BUILTIN_REWARDS: dict[str, Callable] = {
    "cosine": cosine_reward,
    "exact": exact_match_reward,
    "exact_match": exact_match_reward,
    "hybrid": hybrid_reward,
}


def resolve_reward_funcs(reward_funcs):
    """Map built-in reward names in ``reward_funcs`` (a string or a list) to the functions, before TRL reads a string
    as a reward-model id and goes to the Hub. Other strings are refused: pass a loaded model or a callable."""
    if reward_funcs is None:
        return None
    single = not isinstance(reward_funcs, (list, tuple))
    resolved = []
    for func in [reward_funcs] if single else reward_funcs:
        if isinstance(func, str):
            if func not in BUILTIN_REWARDS:
                raise ValueError(
                    f"reward_funcs entry {func!r} is not a built-in reward ({', '.join(BUILTIN_REWARDS)}). "
                    "NSPGRPOTrainer does not download reward models from a name: pass a callable with TRL's reward "
                    "signature, or load the model (AutoModelForSequenceClassification.from_pretrained) and pass it."
                )
            func = BUILTIN_REWARDS[func]
        resolved.append(func)
    return resolved[0] if single else resolved

"""An outcome check of the policy gradient itself, through the whole trainer (sampling, rewards, advantages, TRL's
loss, the optimizer), not one engine against another: with only the NSP term and a reward that pays for one thing
the model rarely does (a rollout that starts with the letter "e"), a few ReFINE steps must make the model do it more.
A flipped advantage or log-prob sign anywhere drives the reward to 0 instead. Measured when written (2-core CPU):
the reward went 0.04 → 0.87 (first 4 → last 4 of 20 steps); with the trainer's advantages negated, 0.04 → 0.03."""

import datasets

from trl_refine import NSPGRPOConfig, NSPGRPOTrainer
from trl_refine.eval import generate_niah
from trl_refine.recipe_utils import ModelArguments, build_model_and_tokenizer


def needle_documents(num: int) -> datasets.Dataset:
    ds = generate_niah("single", num_examples=num, context_length=500, tokenizer=None, haystack="essay", seed=7)
    return datasets.Dataset.from_dict({"text": [f"{p} {', '.join(a)}." for p, a in zip(ds["prompt"], ds["answer"])]})


def starts_with_e(prompts, completions, completion_ids, **kwargs):
    return [1.0 if text.startswith("e") else 0.0 for text in completions]


def test_refine_steps_raise_a_reward_the_base_rarely_earns(tmp_path):
    model, tokenizer = build_model_and_tokenizer(
        ModelArguments(model_name_or_path="trl-refine:tiny_retrieval_delta_net"), seed=0
    )
    args = NSPGRPOConfig(
        output_dir=str(tmp_path),
        max_steps=20,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        documents_per_device=2,
        nsp_num_chunks=4,
        nsp_rollout_length=3,
        nsp_num_rollouts=8,  # G = 8 rollouts per position: groups with a rewarded member carry the signal
        nsp_margin=16,
        ntp_coef=0.0,
        nsp_coef=1.0,
        steps_per_generation=1,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    trainer = NSPGRPOTrainer(
        model,
        args=args,
        reward_funcs=[starts_with_e],
        train_dataset=needle_documents(24),
        processing_class=tokenizer,
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if h.get("reward") is not None]
    assert len(rewards) == 20
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.3, rewards  # the base rarely starts a continuation with "e"
    assert last > first + 0.2, rewards

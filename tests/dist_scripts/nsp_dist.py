"""Multi-process (CPU, gloo) scenarios for tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/dist_scripts/nsp_dist.py OUT_DIR PHASE[,PHASE...]

Phases: generic (tiny Llama, generic engine), snapshot (reference DeltaNet, snapshot engine), fsdp (FSDP2 on the
engines, CPU only), eval (the recipes' sharded evaluation under FSDP2, CPU only), aligned (3 steps with sampling aligned to a 1-process run, checkpoint at step 2), resume (resumes
the aligned run's checkpoint; run it after aligned).

Every rank writes ``OUT_DIR/<phase>/rank<r>.json`` with what it saw locally (documents, rollouts, rewards, its own
loss and NTP loss, model calls per step) and the metrics it logged, so the test can recompute the global metrics
from the ranks' local data and compare them with what the trainer logged.

Data is controlled so that ranks differ: with ``shuffle_dataset=False`` and one document per device, rank r gets
document ``2·step + r``; even documents are short (several chunk positions clamp to the same prefix, so the snapshot
engine meets empty segments), odd documents are long.

The module is also imported by the test for the 1-process reference runs (``AlignedTrainer``, ``make_trainer``).

Environment: ``NSP_DIST_DEVICE=cuda`` runs on GPUs under ``accelerate launch --config_file recipes/accelerate/...``
(DDP, FSDP2, ZeRO-2/3 through the Trainer; the ``fsdp`` phase is CPU-only); ``NSP_DIST_ENGINE=generic`` replaces the
snapshot engine of the ``aligned``/``resume`` phases (ZeRO-3); ``NSP_DIST_OVERRIDES='{"gradient_accumulation_steps":
2}'`` adds config fields (for the 1-process reference run); ``NSP_DIST_TIMEOUT`` is the gloo collective timeout;
``NSP_DIST_MODEL=fla`` uses fla's DeltaNet instead of the reference DeltaNet (GPU).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

from conftest import tiny_delta_net, tiny_fla_config, tiny_llama  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import ByT5Tokenizer, TrainerCallback  # noqa: E402

from trl_refine import NSPGRPOConfig, NSPGRPOTrainer  # noqa: E402
from trl_refine.eval import evaluate  # noqa: E402
from trl_refine.modeling_utils import score_tokens, unwrap  # noqa: E402
from trl_refine.rewards import cosine_reward, exact_match_reward  # noqa: E402
from trl_refine.rollout.base import DocumentBatch, RolloutPlan  # noqa: E402

DEVICE = os.environ.get("NSP_DIST_DEVICE", "cpu")
MODEL = os.environ.get("NSP_DIST_MODEL", "reference")  # "fla": flash-linear-attention DeltaNet (GPU only)
OVERRIDES = json.loads(os.environ.get("NSP_DIST_OVERRIDES", "{}"))
VOCAB = 8  # tiny vocabulary: a random model matches the ground truth often enough for exact-match stats to vary
SHORT, LONG = 50, 160  # tokens; SHORT is the minimum length for n=6, k=3, margin=16
GEOMETRY = dict(nsp_num_chunks=6, nsp_rollout_length=3, nsp_margin=16)


def delta_net(seed: int = 0, vocab: int = VOCAB):
    """The snapshot-engine model: our reference DeltaNet, or (``NSP_DIST_MODEL=fla``, GPU) a small fla DeltaNet, fp32,
    ``fused_recurrent`` kernels (exact enough for the 1-vs-2-process comparison; the shapes of the fp32 GPU parity
    test, so the Triton autotuning done there is reused)."""
    if MODEL == "reference":
        return tiny_delta_net(seed=seed, vocab=vocab)
    from fla.models import DeltaNetForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_fla_config("delta_net", vocab_size=vocab, attn_mode="fused_recurrent", fuse_cross_entropy=False)
    return DeltaNetForCausalLM(cfg).float()


def documents(num: int, seed: int = 0) -> Dataset:
    """Pre-tokenized documents (ids 3..VOCAB-1), even rows SHORT tokens, odd rows LONG tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, VOCAB, (SHORT if i % 2 == 0 else LONG,), generator=g).tolist() for i in range(num)]
    return Dataset.from_dict({"input_ids": ids})


# ----------------------------------------------------------------------------------------------------------------------
# local records
LOCAL: dict = {"steps": defaultdict(dict)}


def _record(key: str, value) -> None:
    LOCAL["steps"][LOCAL["step"]].setdefault(key, []).extend(value)


def exact(prompts, completions, completion_ids, ground_truth_ids, **kwargs):
    values = exact_match_reward(prompts, completions, completion_ids, ground_truth_ids)
    _record("reward_exact", values)
    return values


def position(prompts, completions, completion_ids, prefix_position, **kwargs):
    """Depends on the document length (short on rank 0, long on rank 1), so rank-local means differ a lot."""
    values = [p / 100.0 for p in prefix_position]
    _record("reward_position", values)
    return values


class CallCounter(TrainerCallback):
    """Counts calls of the (unwrapped) model per optimizer step: every rank must make the same number."""

    def __init__(self):
        self.calls = 0
        self.paused = False
        self.per_step: list[int] = []

    def hook(self, *_):
        if not self.paused:
            self.calls += 1

    @contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(self.calls)
        self.calls = 0


class RecordingTrainer(NSPGRPOTrainer):
    """Records this rank's local view of each step. Its only addition is one no-grad scoring call per micro-step on
    every rank (for the local NTP loss), left out of the call count."""

    counter: CallCounter | None = None

    def _generate_and_score_completions(self, inputs):
        LOCAL["step"] = self.state.global_step + 1
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            docs = DocumentBatch(out["doc_input_ids"], out["doc_attention_mask"])
            pos = out["positions"]
            plan = RolloutPlan(pos, self.args.nsp_num_rollouts, self.args.nsp_rollout_length)
            truth = plan.ground_truth(docs)
            step = LOCAL["steps"][LOCAL["step"]]
            step["doc_tokens"] = docs.lengths.tolist()
            step["rollout_tokens"] = int(out["completion_ids"].numel())
            step["exact_matches"] = int((out["completion_ids"] == truth).sum())
            step["positions"] = pos.tolist()
            # a segment that is empty for every local document (two chunks on the same prefix)
            step["empty_segment"] = bool((pos[:, 1:] == pos[:, :-1]).all(0).any())
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            docs = DocumentBatch(inputs["doc_input_ids"], inputs["doc_attention_mask"])
            pause = self.counter.pause() if self.counter is not None else nullcontext()
            with torch.no_grad(), pause:
                logps, _, _ = score_tokens(unwrap(model), docs.input_ids, docs.attention_mask, docs.label_mask())
            mask = docs.label_mask()
            _record("ntp_loss", [float(-(logps * mask).sum() / mask.sum())])
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            _record("loss", [float(loss.detach())])
        return loss


class AlignedTrainer(RecordingTrainer):
    """Rank r draws the rollout noise a 1-process run on the same global batch draws for its documents.

    The stock generator is seeded per (seed, step, rank), so 1- and 2-process runs sample different rollouts. Here
    every rank seeds like rank 0 and skips the uniforms of the rows of lower ranks (the CPU generator fills
    ``torch.rand`` sequentially), which makes the runs comparable token for token. Selection must be deterministic
    (``nsp_selection="argmax"``): multinomial draws depend on the padded batch width.
    """

    def _rollout_generator(self, mode, stream):
        gen = torch.Generator()  # on the CPU whatever the device: its torch.rand is sequential
        gen.manual_seed((self.args.seed * 1_000_003 + self.state.global_step) * 16 + (mode == "eval") * 2 + stream)
        if stream == 1 and mode == "train":
            rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
            skip = self.accelerator.process_index * rows * self.args.nsp_rollout_length
            if skip:
                torch.rand(skip, generator=gen, dtype=torch.float64)
        return gen


def make_config(out: Path, **overrides) -> NSPGRPOConfig:
    kwargs = dict(
        output_dir=str(out),
        bf16=False,
        use_cpu=DEVICE == "cpu",
        report_to="none",
        logging_steps=1,
        learning_rate=1e-2,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        documents_per_device=1,
        max_steps=2,
        seed=11,
        ddp_timeout=120,  # a rank stuck in a collective errors out instead of blocking forever
        nsp_max_length=None,
        log_level="error",
        **GEOMETRY,
    )
    kwargs.update(overrides)
    kwargs.update(OVERRIDES)
    return NSPGRPOConfig(**kwargs)


def make_trainer(cls, model, out: Path, reward_funcs=None, num_docs: int = 8, **overrides):
    args = make_config(out, **overrides)
    trainer = cls(
        model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=documents(num_docs),
        processing_class=ByT5Tokenizer(),
    )
    return trainer


def run(trainer, out: Path, counter: CallCounter | None = None, resume: str | None = None) -> None:
    LOCAL["steps"].clear()
    if counter is not None:
        trainer.counter = counter
        trainer.add_callback(counter)
        unwrap(trainer.model).register_forward_pre_hook(counter.hook)
    trainer.train(resume_from_checkpoint=resume)
    rank = trainer.accelerator.process_index
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "engine": trainer.engine.name,
        "steps": {str(k): v for k, v in sorted(LOCAL["steps"].items())},
        "calls_per_step": counter.per_step if counter is not None else None,
        "reused_sampling_pass": trainer.reused_sampling_pass,
        "logs": [h for h in trainer.state.log_history if "loss" in h],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


# ----------------------------------------------------------------------------------------------------------------------
# phases
def phase_generic(out: Path, **extra) -> None:
    """Generic engine, tiny Llama, ranks with short vs long documents; recorded local stats."""
    trainer = make_trainer(
        RecordingTrainer,
        tiny_llama(seed=0, vocab=VOCAB),
        out,
        reward_funcs=[exact, position],
        nsp_engine="generic",
        nsp_selection="uniform",
        **extra,
    )
    run(trainer, out, CallCounter())


def phase_snapshot(out: Path, **extra) -> None:
    """Snapshot engine, reference DeltaNet, same data (rank 0's short documents have empty segments)."""
    trainer = make_trainer(
        RecordingTrainer,
        delta_net(seed=0),
        out,
        reward_funcs=[cosine_reward, exact, position],
        nsp_engine="snapshot",
        nsp_selection="uniform",
        **extra,
    )
    run(trainer, out, CallCounter())


ALIGNED = dict(
    nsp_engine=os.environ.get("NSP_DIST_ENGINE", "snapshot"),
    nsp_selection="argmax",
    nsp_reward="hybrid",
    nsp_coef=1.0,
    max_steps=3,
)


def phase_aligned(out: Path, **extra) -> None:
    """Aligned sampling, 3 steps, checkpoint at step 2: compared with a 1-process run and with a resumed run."""
    trainer = make_trainer(
        AlignedTrainer,
        delta_net(seed=0),
        out,
        save_strategy="steps",
        save_steps=2,
        **ALIGNED,
        **extra,
    )
    run(trainer, out)
    trainer.save_model(str(out / "final"))


def phase_resume(out: Path, **extra) -> None:
    """Fresh (differently initialised) model, resumed from the aligned run's 2-process checkpoint at step 2."""
    ckpt = out.parent / "aligned" / "checkpoint-2"
    trainer = make_trainer(AlignedTrainer, delta_net(seed=99), out, **ALIGNED, **extra)
    run(trainer, out, resume=str(ckpt))
    trainer.save_model(str(out / "final"))


def _head_is_sharded(model) -> bool:
    """Whether the LM-head weight is currently an FSDP2 shard (a DTensor) rather than the gathered tensor."""
    return hasattr(model.get_output_embeddings().weight, "to_local")


def _engine_step(engine, model, ids: list[int], seed: int, seen: dict | None = None):
    """One ReFINE-shaped step through ``engine`` alone (scan, uniform positions, sampling, loss forward). ``seen``
    collects whether the LM head was sharded after sampling and after the loss forward."""
    from trl_refine.selection import select_positions

    ids_t = torch.tensor(ids)[None]
    docs = DocumentBatch(ids_t, torch.ones_like(ids_t))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        scan = engine.scan(model, docs)
        pos = select_positions(
            scan.entropy,
            docs.attention_mask,
            num_chunks=GEOMETRY["nsp_num_chunks"],
            rollout_length=GEOMETRY["nsp_rollout_length"],
            margin=GEOMETRY["nsp_margin"],
            strategy="uniform",
            generator=gen,
        )
        plan = RolloutPlan(pos, 1, GEOMETRY["nsp_rollout_length"])
        rollout = engine.generate(model, docs, plan, gen)
    if seen is not None:
        seen["head_sharded_after_sampling"] = _head_is_sharded(model)
    fwd = engine.forward_train(model, docs, plan, rollout.completion_ids)
    if seen is not None:
        seen["head_sharded_before_backward"] = _head_is_sharded(model)
    mask = docs.label_mask()
    loss = -(fwd.doc_logps * mask).sum() / mask.sum() - 0.5 * fwd.rollout_logps.mean()
    return loss, bool((pos[:, 1:] == pos[:, :-1]).any())


def accelerate_fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` exactly as ``accelerate launch --config_file recipes/accelerate/fsdp.yaml`` does (accelerate's
    own ``fsdp2_prepare_model``: every ``_no_split_modules`` block, the input embeddings, the tail [final norm, LM
    head] as its own group, then the root), without an ``Accelerator``, which offers FSDP on GPUs only."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )
    stub = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="no",
        torch_device_mesh=None,
        device=next(model.parameters()).device,
    )
    return fsdp2_prepare_model(stub, model)


def head_group_fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    """A second FSDP2 layout: every block, then [final norm, LM head] as one group that reshards after every forward
    (the setting accelerate leaves off for that group), then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block, reshard_after_forward=True)
    fully_shard([model.model.norm, model.lm_head], reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    return model


def phase_fsdp(out: Path) -> None:
    """FSDP2 (``fully_shard``: parameters all-gathered inside every model call, gradients reduce-scattered) on gloo,
    without the Trainer (accelerate offers FSDP on GPUs only). Each engine trains 2 steps on rank-different documents
    (rank 0 short, rank 1 long). A rank making fewer model calls than the other waits in an all-gather until the
    process-group timeout fails the run. Every rank also trains an unsharded replica on both ranks' documents (the
    mean of their losses), so the sharded run's losses and parameters can be checked against it. The snapshot and
    one-pass engines run under accelerate's layout and under `head_group_fsdp2`; where the LM head is sharded at each point of the
    step is recorded (it must be gathered from sampling through the backward, and sharded again after it)."""
    from trl_refine.modeling_utils import ensure_fused_lm_head
    from trl_refine.rollout import GenericEngine, OnePassEngine, SnapshotEngine

    if DEVICE != "cpu":
        raise ValueError(
            "the fsdp phase runs on CPU (gloo); on GPUs use accelerate launch with recipes/accelerate/fsdp.yaml"
        )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    data = documents(2 * world)
    record = {"rank": rank}
    for name, build, engine_cls, shard in (
        ("generic", tiny_llama, GenericEngine, accelerate_fsdp2),
        ("snapshot", tiny_delta_net, SnapshotEngine, accelerate_fsdp2),
        ("snapshot_head_group", tiny_delta_net, SnapshotEngine, head_group_fsdp2),
        ("onepass", tiny_delta_net, OnePassEngine, accelerate_fsdp2),  # what `auto` picks for the reference DeltaNet
        ("onepass_head_group", tiny_delta_net, OnePassEngine, head_group_fsdp2),
    ):
        model = build(seed=0, vocab=VOCAB)
        ensure_fused_lm_head(model)
        replica = build(seed=0, vocab=VOCAB)  # same initial weights, never sharded
        ensure_fused_lm_head(replica)
        model = shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        ref_opt = torch.optim.SGD(replica.parameters(), lr=0.5)
        engine, ref_engine = engine_cls(), engine_cls()
        counter = CallCounter()
        model.register_forward_pre_hook(counter.hook)
        steps = []
        for step in range(2):
            seen = {"head_sharded_at_start": _head_is_sharded(model)}
            ids = data[world * step + rank]["input_ids"]
            loss, empty = _engine_step(engine, model, ids, seed=100 * step + rank, seen=seen)
            loss.backward()
            seen["head_sharded_after_backward"] = _head_is_sharded(model)
            opt.step()
            opt.zero_grad()
            counter.on_step_end(None, None, None)
            ref_losses = [
                _engine_step(ref_engine, replica, data[world * step + r]["input_ids"], seed=100 * step + r)[0]
                for r in range(world)
            ]
            (sum(ref_losses) / world).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            steps.append({"loss": float(loss), "ref_loss": float(ref_losses[rank]), "empty_segment": empty, **seen})
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        ref = replica.state_dict()
        max_diff = max(float((full[k] - ref[k]).abs().max()) for k in ref)
        moved = max(float((ref[k] - v).abs().max()) for k, v in build(seed=0, vocab=VOCAB).state_dict().items())
        record[name] = {"calls_per_step": counter.per_step, "steps": steps, "param_max_diff": max_diff, "moved": moved}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


def phase_eval(out: Path) -> None:
    """The recipes' sharded evaluation under FSDP2 (CPU only): every forward all-gathers, so the ranks must make the
    same number of forward calls although their shards differ in size (5 examples on 2 ranks) and in generation
    budgets. ``lockstep=True`` (what `parameters_sharded` picks under FSDP / ZeRO-3) pads the shards and synchronises
    the decoding. Records the forward calls and the results, and the same evaluation of an unsharded replica on
    this rank alone, for comparison."""
    from trl_refine import PostTrainConfig
    from trl_refine.posttrain import answer_nll
    from trl_refine.recipe_utils import answer_nll_sharded, evaluate_sharded

    if DEVICE != "cpu":
        raise ValueError("the eval phase runs on CPU (gloo)")
    rank = torch.distributed.get_rank()
    tok = ByT5Tokenizer()
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    data = Dataset.from_dict(
        {
            "prompt": [" ".join(words[: i + 1]) * (i + 1) + " answer:" for i in range(5)],
            "answer": [words[i] for i in range(5)],
            "max_gen_tokens": [3, 9, 1, 6, 4],  # generation budgets differ between the ranks' shards
        }
    )
    args = PostTrainConfig(output_dir=str(out / "tmp"), use_cpu=True, bf16=False, report_to="none")
    record = {"rank": rank}
    for decoding in ("generate", "manual"):
        model = accelerate_fsdp2(tiny_delta_net(seed=0, vocab=tok.vocab_size))
        replica = tiny_delta_net(seed=0, vocab=tok.vocab_size)
        counter = CallCounter()
        model.register_forward_pre_hook(counter.hook)
        common = dict(max_new_tokens=None, batch_size=2, use_generate=decoding == "generate", show_progress=False)
        sharded = evaluate_sharded(model, tok, data, "ruler_qa", lockstep=True, **common)
        nll = answer_nll_sharded(model, tok, data, args, lockstep=True)
        counter.on_step_end(None, None, None)
        alone = evaluate(replica, tok, data, "ruler_qa", **common)
        record[decoding] = {
            "forward_calls": counter.per_step[0],
            "predictions": [ex["prediction"] for ex in sharded["examples"]],
            "reference_predictions": [ex["prediction"] for ex in alone["examples"]],
            "score": sharded["score"],
            "reference_score": alone["score"],
            "num_examples": sharded["num_examples"],
            "answer_nll": nll,
            "reference_answer_nll": answer_nll(replica, tok, data, args)["nll"],
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


PHASES = {
    "generic": phase_generic,
    "snapshot": phase_snapshot,
    "aligned": phase_aligned,
    "resume": phase_resume,
    "fsdp": phase_fsdp,
    "eval": phase_eval,
}


def main() -> None:
    torch.set_num_threads(1)
    if DEVICE == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        # a short collective timeout: a rank left waiting in a collective fails the run instead of hanging it
        torch.distributed.init_process_group(
            "gloo", timeout=timedelta(seconds=float(os.environ.get("NSP_DIST_TIMEOUT", 60)))
        )
    out, phases = Path(sys.argv[1]), sys.argv[2].split(",")
    for name in phases:
        PHASES[name](out / name)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

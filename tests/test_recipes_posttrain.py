"""recipes/posttrain.py and recipes/testtime.py run end to end on CPU (shortened with --quick) and write their
before/after tables; bad data fails before any work; the paper-setting YAMLs parse."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from trl import TrlParser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"recipe_{name}"] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


def write_qa_jsonl(path, num=12, answers=True):
    rows = []
    for i in range(num):
        context = " ".join(f"Item {j} is stored in box {(i * 7 + j) % 10}." for j in range(12))
        row = {"prompt": f"{context}\nQuestion: where is item {i % 12}? Answer:"}
        if answers:
            row["answer"] = [f"box {(i * 7 + i % 12) % 10}", "unknown"]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_posttrain_default_quick_runs_and_writes_the_table_with_the_sft_arm_beside(tmp_path, capsys):
    """The embedded default trains Nested ReFINE and, from the same base with the same data, steps, learning rate
    and seed, an SFT baseline arm, reported in a column beside it with a line saying what the table shows."""
    recipe = load_recipe("posttrain")
    out = tmp_path / "post"
    recipe.main(["--quick", "--output_dir", str(out), "--disable_tqdm", "true"])
    printed = capsys.readouterr().out
    assert (
        "Saved the post-trained model to" in printed
        and "| metric | before | after sft | after nested | Δ |" in printed
    )
    assert (
        "What you are looking at: " in printed
        and "after 2 steps of SFT (the baseline) and of Nested ReFINE" in printed
    )
    table = (out / "posttrain_report.md").read_text()
    assert (out / "posttrain_report.png").stat().st_size > 0  # the before/after chart
    assert "Reinforced Fast Weights" in (out / "README.md").read_text()  # the model card
    assert "niah_multikey: string_match_all" in table and "answer NLL" in table and "What you are looking at" in table
    report = json.loads((out / "posttrain_report.json").read_text())
    assert report["posttrain_mode"] == "nested" and report["global_step"] == 2 and report["inner_optimizer_steps"] == 2
    before = report["before"]["niah_multikey"]
    assert before["result"]["num_examples"] == 4 and len(before["result"]["examples"]) == 4
    assert report["baseline_mode"] == "sft"
    sft, nested = (report[k]["niah_multikey"]["answer_nll"] for k in ("baseline", "after"))
    assert sft < before["answer_nll"] and nested < before["answer_nll"]  # two steps on the answers help
    assert sft != nested  # both arms trained, and differently
    assert not (out / "baseline-sft").exists() or not any((out / "baseline-sft").glob("*.safetensors"))
    from transformers import AutoModelForCausalLM

    import trl_refine.models  # noqa: F401

    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "refine_delta_net"


@pytest.mark.slow
def test_posttrain_on_a_jsonl_file_with_held_out_eval(tmp_path, capsys):
    recipe = load_recipe("posttrain")
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    out = tmp_path / "sft"
    argv = ["--quick", "--dataset_name", str(data), "--posttrain_mode", "sft", "--output_dir", str(out)]
    recipe.main([*argv, "--num_eval_examples", "3", "--disable_tqdm", "true"])
    report = json.loads((out / "posttrain_report.json").read_text())
    (label,) = report["before"]
    assert label == "qa (held out)" and report["before"][label]["result"]["num_examples"] == 3
    assert report["before"][label]["result"]["metric"] == "ruler_qa_substring"
    assert report["inner_optimizer_steps"] == 0


def test_posttrain_bad_data_fails_before_any_work(tmp_path):
    recipe = load_recipe("posttrain")
    data = write_qa_jsonl(tmp_path / "noanswer.jsonl", answers=False)
    with pytest.raises(ValueError, match="missing column"):
        recipe.main(
            ["--quick", "--dataset_name", str(data), "--output_dir", str(tmp_path / "x"), "--skip_eval", "true"]
        )
    assert not (tmp_path / "x" / "posttrain_report.md").exists()


@pytest.mark.parametrize("long_examples", ["error", "drop", "truncate", "truncate_end"])
def test_posttrain_eval_cuts_prompts_as_training_cut_them(tmp_path, monkeypatch, byte_tokenizer, long_examples):
    """The recipe evaluates the prompt training saw: its middle cut (truncate), its first max_length -
    max_answer_length tokens (truncate_end, the release's cut; evaluated whole before), or the whole prompt (error /
    drop, under which no training prompt is cut)."""
    import datasets
    from conftest import small_config

    from trl_refine.posttrain import PostTrainConfig, encode_prompt_answer
    from trl_refine.utils import truncate_prompt

    recipe = load_recipe("posttrain")
    seen = {}

    def evaluate_spy(model, tokenizer, dataset, task, **kwargs):
        seen.update(kwargs)
        return {"score": 0.0}

    monkeypatch.setattr(recipe, "evaluate_sharded", evaluate_spy)
    monkeypatch.setattr(recipe, "answer_nll_sharded", lambda *args, **kwargs: 0.0)
    args = small_config(tmp_path, PostTrainConfig, max_length=20, max_answer_length=4, long_examples=long_examples)
    script = SimpleNamespace(
        eval_max_examples=None, eval_task="ruler_qa", eval_max_new_tokens=4, eval_batch_size=1, eval_decoding="greedy"
    )
    prompt = "x" * 10 + "y" * 20 + " Question: where? Answer:"
    ds = datasets.Dataset.from_dict({"prompt": [prompt], "answer": [["Paris"]]})
    recipe.run_eval(None, byte_tokenizer, {"held out": ds}, script, args, "before")
    ids = byte_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    evaluated = truncate_prompt(ids, seen["max_prompt_tokens"], seen["prompt_truncation"])
    if long_examples in ("error", "drop"):
        assert evaluated == ids
    else:
        trained, _ = encode_prompt_answer(prompt, "Pari", byte_tokenizer, args)  # an answer of max_answer_length
        assert evaluated == trained and len(trained) == 16


@pytest.mark.slow
def test_testtime_default_quick_runs_and_writes_the_table_with_the_ntp_arm_beside(tmp_path, capsys):
    recipe = load_recipe("testtime")
    out = tmp_path / "ttt"
    recipe.main(["--quick", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "| metric | without | with sft | with ReFINE | Δ |" in printed
    assert "What you are looking at: " in printed and "1 NTP-only step(s) on each prompt (with sft)" in printed
    report = json.loads((out / "testtime_report.json").read_text())
    assert report["results"]["with"]["niah_multikey"]["adapted"] is True
    assert report["results"]["with sft"]["niah_multikey"]["adapted"] is True
    assert report["results"]["without"]["niah_multikey"]["num_examples"] == 3
    nll = {run: report["answer_nll"][run]["niah_multikey"] for run in ("without", "with sft", "with")}
    # each adaptation changed the weights (the random tiny model's exact-match rewards are all 0, so the ReFINE arm's
    # policy gradient is 0 and it may equal the NTP-only arm: not asserted)
    assert nll["with"] != nll["without"] and nll["with sft"] != nll["without"], nll
    assert "answer NLL" in (out / "testtime_report.md").read_text()
    # the adaptation's own numbers are reported: one line per adapted arm, and the summary in the JSON
    assert "Adaptation (with ReFINE): " in printed and "NTP loss" in printed and "reward" in printed
    assert report["adaptation"]["with ReFINE"]["optimizer_steps"] >= 1
    assert report["adaptation"]["with sft"]["per_step"][0]["ntp_loss"] > 0
    assert "greedy decoding" in printed  # the decoding named in the title is the one used


def test_testtime_refuses_an_unknown_baseline_mode(tmp_path):
    with pytest.raises(ValueError, match="baseline_mode='ntp'; choose sft"):
        load_recipe("testtime").main(["--quick", "--baseline_mode", "ntp", "--output_dir", str(tmp_path)])


CPU = ["--use_cpu", "true", "--bf16", "false"]


@pytest.mark.parametrize("model", ["delta_net_1.3B", "lact_760M"])
def test_paper_configs_parse_with_the_official_values(model):
    post = load_recipe("posttrain")
    model_args, script, args = TrlParser(post.ARGUMENT_CLASSES).parse_args_and_config(
        args=["--config", str(CONFIGS / f"posttrain_{model}.yaml"), *CPU]
    )
    assert (args.posttrain_mode, args.nsp_reward, args.learning_rate, args.max_length) == (
        "nested",
        "hybrid",
        1e-6,
        8192,
    )
    assert (args.ntp_coef, args.nsp_coef, args.max_answer_length, args.nsp_num_chunks) == (1.0, 0.2, 32, 8)
    assert args.documents_per_device * args.gradient_accumulation_steps * 8 == 16  # official mini-batch on 8 GPUs
    assert script.eval_dataset_name and model_args.dtype == "float32"

    ttt = load_recipe("testtime")
    model_args, script, cfg = TrlParser(ttt.ARGUMENT_CLASSES).parse_args_and_config(
        args=["--config", str(CONFIGS / f"testtime_{model}.yaml")]
    )
    assert (cfg.nsp_reward, cfg.ntp_coef, cfg.nsp_coef, cfg.learning_rate) == ("exact", 1.0, 0.4, 1e-6)
    assert (script.batch_size, cfg.mini_batch_size, script.max_new_tokens, cfg.max_prompt_tokens) == (8, 4, 32, 16352)
    for name in script.dataset_name.split(","):
        assert (ROOT / name).exists() or name.startswith("../shared"), name

    mid = load_recipe("midtrain")
    model_args, script, args = TrlParser(mid.ARGUMENT_CLASSES).parse_args_and_config(
        args=["--config", str(CONFIGS / f"midtrain_{model}.yaml"), *CPU]
    )
    assert (args.nsp_reward, args.nsp_coef, args.nsp_max_length) == ("cosine", 0.2, 16384)
    if model == "lact_760M":
        assert model_args.model_name_or_path == "YunjinZhang/lact_llm"


def test_default_configs_parse():
    post = load_recipe("posttrain")
    model_args, script, args = TrlParser(post.ARGUMENT_CLASSES).parse_args_and_config(
        args=["--config", post.DEFAULT_CONFIG]
    )
    assert (
        args.use_cpu
        and model_args.model_name_or_path == "trl-refine:tiny_retrieval_delta_net"
        and args.posttrain_mode == "nested"
    )
    ttt = load_recipe("testtime")
    model_args, script, cfg = TrlParser(ttt.ARGUMENT_CLASSES).parse_args_and_config(
        args=["--config", ttt.DEFAULT_CONFIG]
    )
    assert (
        model_args.model_name_or_path == "trl-refine:tiny_retrieval_delta_net"
        and cfg.reset == "batch"
        and cfg.steps >= 1
    )

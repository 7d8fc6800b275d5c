"""The ReFINE evaluation scorers as a Hugging Face `evaluate` module, loaded offline from the installed package.

    import evaluate
    from trl_refine.eval import metric_path
    metric = evaluate.load(metric_path(), "lcc")          # or trl_refine.eval.load_metric("lcc")
    metric.compute(predictions=["x = 1"], references=[["x = 1"]])   # {"score": 1.0, "metric": "code_sim", ...}

The configuration name is the task: ``ruler_qa``, ``niah`` (or a NIAH family), or a LongBench task. Scores are the
mean over the examples in [0, 1], computed by `trl_refine.eval.score_predictions` (the same code as the evaluator).
``compute(..., code_sim="thudm")`` picks the LongBench code-similarity variant (default ``release``).
"""

import datasets
import evaluate

from trl_refine.eval.evaluator import get_scorer
from trl_refine.eval.longbench import LONGBENCH_TASK_METRICS, longbench_scorer

_CITATION = """@article{hwang2026refine,
  title   = {Reinforced Fast Weights with Next-Sequence Prediction},
  author  = {Hwang, Hee Seung and Wu, Xindi and Chun, Sanghyuk and Russakovsky, Olga},
  journal = {arXiv preprint arXiv:2602.16704},
  year    = {2026}
}"""

_KWARGS = """
Args:
    predictions: list of generated answers (strings).
    references: list of gold answers per prediction (a string or a list of strings).
    code_sim: LongBench code-similarity variant, "release" (default) or "thudm".
Returns:
    score: mean score in [0, 1]; metric: the metric's name; num_examples.
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS)
class RefineEval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, code_sim="release"):
        task = self.config_name
        if task == "default":
            raise ValueError("name the task: evaluate.load(metric_path(), 'ruler_qa' | 'niah' | a LongBench task)")
        if task in LONGBENCH_TASK_METRICS:
            metric, scorer = LONGBENCH_TASK_METRICS[task], longbench_scorer(task, code_sim=code_sim)
        else:
            _, metric, scorer = get_scorer(task)
        scores = [scorer(p, r) for p, r in zip(predictions, references)]
        return {
            "score": sum(scores) / len(scores) if scores else float("nan"),
            "metric": metric,
            "num_examples": len(scores),
        }

"""VQA accuracy as a Hugging Face `evaluate` metric module.

    import evaluate, transformers_alignedvq
    metric = evaluate.load(transformers_alignedvq.VQA_ACCURACY_METRIC)
    metric.compute(predictions=["Two", "red"], references=[["2", "2", "two"], ["blue"]])

The scoring lives in `transformers_alignedvq.evaluation` (VQA-v2 normalisation; ``min(matches / 3, 1)`` for
several references, exact match for one); this module only adapts it to `evaluate`'s interface.
"""

import datasets
import evaluate

from transformers_alignedvq.evaluation import vqa_score

_DESCRIPTION = __doc__
_CITATION = """\
@inproceedings{goyal2017making,
  title={Making the V in VQA Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): predicted answers.
    references (`list[list[str]]`): reference answers per question (one or more).
Returns:
    accuracy (`float`): mean VQA score in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        scores = [vqa_score(p, r) for p, r in zip(predictions, references)]
        return {"accuracy": sum(scores) / len(scores) if scores else 0.0}

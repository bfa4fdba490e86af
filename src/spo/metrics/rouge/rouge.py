"""ROUGE-1/2/L as a local ``evaluate`` metric module, wrapping Google's ``rouge_score``.

Kept in the repository so that judging never reaches the Hugging Face hub: load it with
``evaluate.load("<absolute path to this folder>")`` (see ``spo.judging.statistics.load_rouge``).
Scores are F-measures averaged over the predictions (``use_aggregator=True``, the default, gives
plain means rather than ``rouge_score``'s bootstrap aggregator, so results are deterministic) or
one list per item (``use_aggregator=False``).
"""

from __future__ import annotations

import datasets
import evaluate
from rouge_score import rouge_scorer

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    pages = "74--81",
}
"""

_DESCRIPTION = """\
ROUGE-1, ROUGE-2 and ROUGE-L F-measures of predictions against one reference each, computed
with the `rouge_score` package (Porter stemming on by default).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
    rouge_types: subset of ["rouge1", "rouge2", "rougeL", "rougeLsum"] (default: rouge1, rouge2, rougeL).
    use_stemmer: Porter stemming before matching (default True).
    use_aggregator: return means (True, default) or one list of per-item scores per type (False).
Returns:
    dict rouge type -> F-measure (float) or list of floats.
Examples:
    >>> rouge = evaluate.load("src/spo/metrics/rouge")
    >>> rouge.compute(predictions=["the cat sat"], references=["the cat sat"])["rouge1"]
    1.0
"""

DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013/"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=True, use_aggregator=True):
        types = list(rouge_types or DEFAULT_TYPES)
        scorer = rouge_scorer.RougeScorer(rouge_types=types, use_stemmer=use_stemmer)
        per_type: dict[str, list[float]] = {t: [] for t in types}
        for prediction, reference in zip(predictions, references):
            scores = scorer.score(reference, prediction)
            for t in types:
                per_type[t].append(float(scores[t].fmeasure))
        if not use_aggregator:
            return per_type
        return {t: (sum(v) / len(v) if v else 0.0) for t, v in per_type.items()}

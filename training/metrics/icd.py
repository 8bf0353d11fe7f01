"""ICD flag metrics as a local `evaluate` module: per-flag, micro and macro F1, and the format-validity rate.

Load it offline from its path (it never touches the hub):

    from training.metrics.scores import load_metric
    metric = load_metric("icd")  # = evaluate.load(".../training/metrics/icd.py")
    metric.compute(predictions=generated_reports, references=target_texts)

Inputs are Stage B report texts (datasets_io.records); the ICD block is parsed with `records.parse_target`.
`{"findings": "None"}` means no flag. A prediction whose ICD block is missing or malformed (bad JSON, non-boolean
values) is invalid: it counts against `valid_rate` and scores as "no flag". Flags scored: records.ICD_FLAGS plus any
other flag named in the references; predicted flags outside that set are ignored. A flag with no positive on either
side has no F1 (NaN, left out of macro-F1) unless `zero_division` is given.
Plain-Python version for dicts: `scores.icd_scores`.
"""

from __future__ import annotations

import evaluate

from training.metrics import scores

_CITATION = "F1 conventions in training/metrics/scores.py."

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated Stage B report texts, one per study (None or '' for no output: invalid).
    references: target Stage B report texts, one per study.
    zero_division: F1 of a flag with no positive in references nor predictions; default None: NaN, and the flag
        is left out of macro-F1 (see training/metrics/scores.py).
Returns:
    n, valid_rate, micro_f1, macro_f1, f1/{flag}, support/{flag}.
"""


class IcdF1(evaluate.Metric):
    """ICD flag F1 (per flag, micro, macro) and validity of generated Stage B reports."""

    def _info(self) -> evaluate.MetricInfo:
        return scores.text_pair_metric_info(__doc__ or "", _CITATION, _KWARGS_DESCRIPTION)

    def _compute(
        self, predictions: list[str | None], references: list[str], zero_division: float | None = None
    ) -> dict[str, float]:
        preds = [scores.icd_from_text(t) for t in predictions]
        refs = scores.parse_references(references, scores.icd_from_text, "icd")
        return scores.icd_scores(preds, refs, zero_division=zero_division)  # type: ignore[arg-type]

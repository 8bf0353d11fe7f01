"""CheXpert label metrics as a local `evaluate` module: per-label, micro and macro F1 (14 labels and CHEXPERT_5)
under both Uncertain conventions, and the format-validity rate.

Load it offline from its path (it never touches the hub):

    from training.metrics.scores import load_metric
    metric = load_metric("chexpert")  # = evaluate.load(".../training/metrics/chexpert.py")
    metric.compute(predictions=generated_reports, references=target_texts)

Inputs are report texts in the curriculum format (datasets_io.records); the CheXpert block is parsed with
`records.parse_target`. A prediction whose CheXpert block is missing or malformed (bad JSON, a value other than
Positive/Negative/Uncertain) is invalid: it counts against `valid_rate` and scores as "no label positive". A missing
label is not positive; unknown labels are ignored. References must parse (ValueError naming the index otherwise).
"u_pos" counts Uncertain as positive, "u_neg" as negative. A label with no positive on either side has no F1
(NaN, left out of macro-F1) unless `zero_division` is given. Plain-Python version for dicts: `scores.chexpert_scores`.
"""

from __future__ import annotations

import evaluate

from training.metrics import scores

_CITATION = "Irvin et al. 2019, CheXpert (labels); F1 conventions in training/metrics/scores.py."

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated report texts, one per study (None or '' for no output: invalid).
    references: target report texts, one per study.
    zero_division: F1 of a label with no positive in references nor predictions; default None: NaN, and the label
        is left out of macro-F1 (see training/metrics/scores.py).
Returns:
    n, valid_rate, and for conv in (u_pos, u_neg): {conv}/micro_f1, {conv}/macro_f1, {conv}/micro_f1_5,
    {conv}/macro_f1_5, {conv}/f1/{label}, {conv}/support/{label}.
"""


class CheXpertF1(evaluate.Metric):
    """CheXpert F1 (per label, micro, macro; 14 and 5 labels; u_pos and u_neg) and validity of generated reports."""

    def _info(self) -> evaluate.MetricInfo:
        return scores.text_pair_metric_info(__doc__ or "", _CITATION, _KWARGS_DESCRIPTION)

    def _compute(
        self, predictions: list[str | None], references: list[str], zero_division: float | None = None
    ) -> dict[str, float]:
        preds = [scores.chexpert_from_text(t) for t in predictions]
        refs = scores.parse_references(references, scores.chexpert_from_text, "chexpert")
        return scores.chexpert_scores(preds, refs, zero_division=zero_division)  # type: ignore[arg-type]

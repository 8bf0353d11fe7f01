"""Report text metrics as a local `evaluate` module: corpus BLEU-1..4 (comparable sacrebleu 13a, and the project's
own tokenization) and mean ROUGE-L F-measure (rouge-score defaults).

Load it offline from its path (it never touches the hub):

    from training.metrics.scores import load_metric
    metric = load_metric("report_text")  # = evaluate.load(".../training/metrics/report_text.py")
    metric.compute(predictions=[...], references=[...])

`bleu_n_13a` is sacrebleu's corpus BLEU-n with its defaults (13a, case-sensitive, exp smoothing), / 100: the figure
to compare with published tables. `bleu_n` is the project's case-insensitive, unsmoothed BLEU on its own tokens.
`rouge_l` is rouge-score's ROUGE-L F (no stemming), averaged. Conventions: `training/metrics/scores.py`.
"""

from __future__ import annotations

import evaluate

from training.metrics import scores

_CITATION = "Papineni et al. 2002 (BLEU); Lin 2004 (ROUGE)."

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts, one per study ('' for no output).
    references: reference texts, one per study.
    max_order: highest BLEU n-gram order (default 4).
    impression_only: score only the Impression block of each text (reports in the curriculum format); a text
        without one scores as ''.
Returns:
    bleu_1 .. bleu_{max_order}, bleu_1_13a .. bleu_{max_order}_13a, brevity_penalty, length_ratio, rouge_l.
"""


class ReportText(evaluate.Metric):
    """Corpus BLEU-1..n and mean ROUGE-L F of generated reports against references."""

    def _info(self) -> evaluate.MetricInfo:
        return scores.text_pair_metric_info(__doc__ or "", _CITATION, _KWARGS_DESCRIPTION)

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        max_order: int = 4,
        impression_only: bool = False,
    ) -> dict[str, float]:
        if impression_only:
            predictions = [scores.impression_from_text(t) for t in predictions]
            references = [scores.impression_from_text(t) for t in references]
        out = scores.bleu(predictions, references, max_order=max_order)
        out.update(scores.sacrebleu_bleu(predictions, references, max_order=max_order))
        out["rouge_l"] = scores.rouge_l(predictions, references)
        return out

"""Clinical metrics of generated report text as a local `evaluate` module: CheXbert labeler F1, RadGraph F1 and
BERTScore, each computed only when its local weights directory is given (training/metrics/clinical.py: the files,
the conventions, why CheXbert is loaded without the f1chexbert package).

Load it offline from its path (it never touches the hub):

    from training.metrics.scores import load_metric
    metric = load_metric("clinical_text")  # = evaluate.load(".../training/metrics/clinical_text.py")
    metric.compute(predictions=[...], references=[...], chexbert="weights/chexbert",
                   bertscore_model="weights/distilroberta-base")

The launcher's evaluation calls the same code (`clinical.ClinicalScorers`).
"""

from __future__ import annotations

import evaluate

from training.metrics import scores
from training.metrics.clinical import ClinicalScorers

_CITATION = (
    "Smit et al. 2020 (CheXbert); Jain et al. 2021 (RadGraph); Delbrouck et al. 2022 (RadGraph reward); "
    "Zhang et al. 2020 (BERTScore)."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts (Impressions), one per study ('' for no output).
    references: reference texts, one per study.
    chexbert, radgraph, bertscore_model: local weight directories; a metric without one is skipped.
    impression_only: score only the Impression block of texts in the curriculum format.
Returns:
    chexbert/{u_neg,u_pos}/{micro,macro}_f1[_5], radgraph_f1, bertscore_f1 (those computed), and `skipped`: one line
    per metric left out, naming what to download and where to put it.
"""


class ClinicalText(evaluate.Metric):
    """CheXbert labeler F1 (14 / 5 labels, micro / macro, Uncertain as negative / positive), RadGraph F1, BERTScore."""

    def _info(self) -> evaluate.MetricInfo:
        return scores.text_pair_metric_info(__doc__ or "", _CITATION, _KWARGS_DESCRIPTION)

    def _compute(
        self,
        predictions: list[str | None],
        references: list[str],
        chexbert: str | None = None,
        radgraph: str | None = None,
        bertscore_model: str | None = None,
        impression_only: bool = False,
    ) -> dict:
        preds = [p or "" for p in predictions]
        refs = list(references)
        if impression_only:
            preds = [scores.impression_from_text(t) for t in preds]
            refs = [scores.impression_from_text(t) for t in refs]
        scorers = ClinicalScorers.load(chexbert, radgraph, bertscore_model)
        out: dict = {k.split("/", 1)[1]: v.value for k, v in scorers.stats(preds, refs).items()}
        out["skipped"] = list(scorers.skipped)
        return out

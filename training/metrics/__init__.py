"""Evaluation metrics for generated reports (issue 5, the EHR A/B test).

- `scores.py`: plain-Python metrics (BLEU-1..4, ROUGE-L, CheXpert F1s, ICD F1s, validity, majority baseline), their
  conventions in its docstring, and `load_metric(name)` for the `evaluate` modules below.
- `report_text.py`, `chexpert.py`, `icd.py`: one `evaluate.Metric` each, loaded offline from their file path.
- `stats.py`: bootstrap confidence intervals and the paired A/B test (approximate randomization, paired bootstrap).

Nothing here imports `evaluate` at import time (a slow import); only `scores.load_metric` and the module files do.
"""

"""What `launcher evaluate` was asked to do (its flags, as one object every part of the evaluation reads)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalOptions:
    data: str
    data_root: str
    out: str
    checkpoint: str | None = None
    model_uri: str | None = None
    baseline_checkpoint: str | None = None  # a separately trained model compared on the same studies and arms
    ehr: str = "both"
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: the smallest data.max_seq_len minus the longest prompt of any arm
    save_predictions: bool = False
    seed: int = 0
    n_resamples: int = 1000
    device: str = "auto"
    compare_stage_a_end: bool = True
    chexbert: str | None = None  # local CheXbert directory (training/metrics/clinical.py lists the files)
    radgraph: str | None = None  # local RadGraph directory (holding radgraph/)
    bertscore_model: str | None = None  # local transformers model directory for BERTScore
    tracking_uri: str | None = None
    mlflow: bool = True
    progress: bool = True

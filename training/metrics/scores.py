"""Report metrics as plain Python: importable without `evaluate`, called by the `evaluate` modules next to this file.

Text -- two BLEUs side by side, one ROUGE-L:
- Comparable BLEU-1..4 (`sacrebleu_bleu`, keys `bleu_n_13a`): sacrebleu with its defaults (13a tokenizer,
  case-sensitive, "exp" smoothing), corpus level, in [0, 1] (sacrebleu's score / 100). These are the figures to set
  beside a published table. The per-study statistics are sacrebleu's own counts and the score is sacrebleu's own
  `compute_bleu`, so the bootstrap recomputes exactly what sacrebleu would on each resample.
- The project's BLEU-1..4 (`bleu`, keys `bleu_n`): case-insensitive; `tokenize(text)`: lowercase, then the regex
  `[a-z0-9]+|[^\\sa-z0-9]` (words, and each other non-space character as a token: "3.5 cm." -> 3 . 5 cm .).
  Corpus BLEU-n: clipped n-gram matches and totals summed over the corpus, geometric mean of p_1..p_n, times the
  brevity penalty exp(1 - r/c) when c < r. No smoothing: BLEU-n is 0 when some order <= n has no match
  (= sacrebleu `tokenize="none", smooth_method="none"` on these tokens). Kept for continuity with earlier runs.
- ROUGE-L (`rouge_l`): rouge-score's `RougeScorer(["rougeL"])` with its defaults (lowercase, non-alphanumerics
  dropped, no stemming), per-sample LCS F-measure averaged over samples: comparable as it is.

CheXpert -- inputs are dicts label -> "Positive" | "Negative" | "Uncertain" (one per study):
- A missing label is not positive; labels outside the 14 CheXpert labels are ignored.
- A prediction that is None, not a dict, or has a value outside the three is *invalid*: it scores as "no label
  positive" and counts against `valid_rate`. References must be valid (ValueError otherwise).
- "u_pos" counts Uncertain as positive, "u_neg" as negative, in predictions and references alike.
- F1 = 2TP / (2TP + FP + FN). Micro-F1 pools TP/FP/FN over the labels of the set (14, or the 5 of CHEXPERT_5);
  macro-F1 is the unweighted mean of per-label F1s.
- A label with no positive in references nor predictions has an undefined F1. Default (`zero_division=None`): its
  F1 is NaN and macro-F1 averages over the defined labels only (NaN if none is defined, likewise micro-F1 when
  nothing is positive anywhere). Why: on a small test set rare labels are often absent, and counting them as 1.0
  (sklearn zero_division=1) inflates macro-F1 while 0.0 (sklearn's default) deflates it, both by the label
  prevalence of the sample rather than by the model. Pass `zero_division=0.0` or `1.0` for sklearn's
  `f1_score(y_true, y_pred, average=..., zero_division=...)` over all labels of the set.

ICD -- dicts flag -> bool (`{"findings": "None"}` means no flag):
- Flag set = records.ICD_FLAGS + any other flag named in the references (sorted); predicted flags outside the set
  are ignored. A missing flag is False. Invalid predictions (None, non-bool values) score as no flag and count against
  `valid_rate`. F1 conventions (and `zero_division`) as for CheXpert.

Uncertainty: the `*_metric` functions return `stats.SummedStats` (per-study sufficient statistics) for
`stats.bootstrap_ci`, `stats.paired_randomization_test` and `stats.compare_arms`.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from datasets_io.records import CHEXPERT_5, CHEXPERT_LABELS, CHEXPERT_VALUES, ICD_FLAGS, ICD_NONE, parse_target
from training.metrics.stats import SummedStats

if TYPE_CHECKING:
    import evaluate

Convention = Literal["u_pos", "u_neg"]
Average = Literal["micro", "macro", "none"]
CONVENTIONS: tuple[Convention, ...] = ("u_pos", "u_neg")
_POSITIVE_VALUES: dict[str, frozenset[str]] = {
    "u_pos": frozenset({"Positive", "Uncertain"}),
    "u_neg": frozenset({"Positive"}),
}

METRIC_NAMES: tuple[str, ...] = ("report_text", "chexpert", "icd", "clinical_text")
_METRICS_DIR = Path(__file__).resolve().parent

_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
_WORD_RE = re.compile(r"[a-z0-9]+")


# --------------------------------------------------------------------------------------------- input checks
def _check_pairs(predictions: Sequence[Any], references: Sequence[Any], what: str) -> int:
    if len(predictions) != len(references):
        raise ValueError(f"{what}: {len(predictions)} predictions but {len(references)} references")
    if not len(predictions):
        raise ValueError(f"{what}: no samples to score")
    return len(predictions)


def _check_texts(texts: Sequence[Any], side: str, what: str) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}: {side}[{i}] is {type(text).__name__}, expected str (use '' for no output)")


# --------------------------------------------------------------------------------------------- report parsing
def tokenize(text: str, *, punctuation: bool = True) -> list[str]:
    """Lowercased word tokens, plus one token per punctuation character when `punctuation` (see module docstring)."""
    return (_TOKEN_RE if punctuation else _WORD_RE).findall(text.lower())


def impression_from_text(text: str | None) -> str:
    """The Impression block of a report ('' when it is missing or the text is empty)."""
    if not isinstance(text, str):
        return ""
    return parse_target(text, expect_icd=False).impression or ""


def chexpert_from_text(text: str | None, *, strict: bool = False) -> dict[str, str] | None:
    """The CheXpert dict of a report; None when the block is missing or malformed (ValueError instead when strict)."""
    parsed = parse_target(text, expect_icd=False)  # type: ignore[arg-type]  # parse_target tolerates non-str
    problems = [p for p in parsed.problems if "CheXpert" in p or p == "empty text"]
    if problems or parsed.chexpert is None:
        if strict:
            raise ValueError(f"invalid CheXpert block: {'; '.join(problems)}")
        return None
    return parsed.chexpert


def icd_from_text(text: str | None, *, strict: bool = False) -> dict[str, bool] | None:
    """The ICD flags of a Stage B report; None when the block is missing or malformed (ValueError when strict)."""
    parsed = parse_target(text, expect_icd=True)  # type: ignore[arg-type]
    problems = [p for p in parsed.problems if "ICD" in p or p == "empty text"]
    if problems or parsed.icd is None:
        if strict:
            raise ValueError(f"invalid ICD block: {'; '.join(problems)}")
        return None
    return parsed.icd


def text_pair_metric_info(description: str, citation: str, inputs_description: str) -> Any:
    """The `evaluate.MetricInfo` the three metric modules share: string predictions against string references.
    (Imports evaluate lazily: this module stays importable without it.)"""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
    )


def parse_references(texts: Sequence[str], parse: Callable[..., Any], metric: str) -> list[Any]:
    """Parse reference reports strictly; a reference that does not parse is an error naming its index."""
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(parse(text, strict=True))
        except ValueError as e:
            raise ValueError(f"{metric}: references[{i}]: {e}") from None
    return out


def report_validity(texts: Sequence[str | None], *, expect_icd: bool) -> np.ndarray:
    """(N,) bool: the whole report parses (Impression, CheXpert and, when expected, ICD blocks all well-formed)."""
    return np.array([parse_target(t, expect_icd=expect_icd).valid for t in texts], dtype=bool)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- BLEU
def bleu_stats(predictions: Sequence[str], references: Sequence[str], *, max_order: int = 4) -> np.ndarray:
    """Per-sample BLEU statistics (N, 2 * max_order + 2): matches_1..n, totals_1..n, hypothesis and reference length."""
    n = _check_pairs(predictions, references, "bleu")
    _check_texts(predictions, "predictions", "bleu")
    _check_texts(references, "references", "bleu")
    out = np.zeros((n, 2 * max_order + 2), dtype=np.float64)
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        hyp, gold = tokenize(pred), tokenize(ref)
        for order in range(1, max_order + 1):
            hyp_grams = Counter(tuple(hyp[j : j + order]) for j in range(len(hyp) - order + 1))
            ref_grams = Counter(tuple(gold[j : j + order]) for j in range(len(gold) - order + 1))
            out[i, order - 1] = sum(min(count, ref_grams[gram]) for gram, count in hyp_grams.items())
            out[i, max_order + order - 1] = max(len(hyp) - order + 1, 0)
        out[i, 2 * max_order] = len(hyp)
        out[i, 2 * max_order + 1] = len(gold)
    return out


def bleu_from_stats(stats: np.ndarray, order: int, *, max_order: int = 4) -> np.ndarray:
    """Corpus BLEU-`order` from summed statistics (..., 2 * max_order + 2) -> (...). Vectorized over leading axes."""
    if not 1 <= order <= max_order:
        raise ValueError(f"BLEU order must be in 1..{max_order}, got {order}")
    s = np.asarray(stats, dtype=np.float64)
    matches, totals = s[..., :order], s[..., max_order : max_order + order]
    hyp_len, ref_len = s[..., 2 * max_order], s[..., 2 * max_order + 1]
    ok = (matches > 0).all(axis=-1) & (hyp_len > 0)  # matches > 0 implies totals > 0
    log_precision = (np.log(np.where(matches > 0, matches, 1.0)) - np.log(np.where(totals > 0, totals, 1.0))).mean(-1)
    log_bp = np.where(hyp_len < ref_len, 1.0 - ref_len / np.where(hyp_len > 0, hyp_len, 1.0), 0.0)
    return np.where(ok, np.exp(log_precision + log_bp), 0.0)


def bleu(predictions: Sequence[str], references: Sequence[str], *, max_order: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..max_order in [0, 1] (keys `bleu_1`..), `brevity_penalty` and `length_ratio` (hyp / ref)."""
    total = bleu_stats(predictions, references, max_order=max_order).sum(axis=0)
    out = {f"bleu_{k}": float(bleu_from_stats(total, k, max_order=max_order)) for k in range(1, max_order + 1)}
    hyp_len, ref_len = total[2 * max_order], total[2 * max_order + 1]
    out["brevity_penalty"] = float(1.0 if hyp_len >= ref_len else (np.exp(1 - ref_len / hyp_len) if hyp_len else 0.0))
    out["length_ratio"] = float(hyp_len / ref_len) if ref_len else float("nan")
    return out


# --------------------------------------------------------------------------------------------- comparable BLEU
def sacrebleu_stats(predictions: Sequence[str], references: Sequence[str], *, max_order: int = 4) -> np.ndarray:
    """Per-sample sacrebleu statistics (N, 2 * max_order + 2): correct_1..n, total_1..n, hypothesis and reference
    length, with sacrebleu's defaults (13a tokenizer, case-sensitive): the figures published tables report."""
    from sacrebleu.metrics import BLEU

    n = _check_pairs(predictions, references, "sacrebleu")
    _check_texts(predictions, "predictions", "sacrebleu")
    _check_texts(references, "references", "sacrebleu")
    # effective_order only changes the sentence *score* (unused here), not the counts; it silences sacrebleu's warning.
    scorer = BLEU(max_ngram_order=max_order, effective_order=True)
    out = np.zeros((n, 2 * max_order + 2), dtype=np.float64)
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        s = scorer.sentence_score(pred, [ref])
        out[i] = [*s.counts, *s.totals, s.sys_len, s.ref_len]
    return out


def sacrebleu_from_stats(stats: np.ndarray, order: int, *, max_order: int = 4) -> np.ndarray:
    """Corpus BLEU-`order` in [0, 1] from summed sacrebleu statistics (..., 2 * max_order + 2) -> (...), computed by
    sacrebleu's own `BLEU.compute_bleu` with its default "exp" smoothing (one Python call per row: ~20 us)."""
    from sacrebleu.metrics import BLEU

    if not 1 <= order <= max_order:
        raise ValueError(f"BLEU order must be in 1..{max_order}, got {order}")
    s = np.asarray(stats, dtype=np.float64)
    flat = s.reshape(-1, s.shape[-1])
    values = [
        BLEU.compute_bleu(
            correct=[int(round(c)) for c in row[:order]],
            total=[int(round(t)) for t in row[max_order : max_order + order]],
            sys_len=int(round(row[2 * max_order])),
            ref_len=int(round(row[2 * max_order + 1])),
            smooth_method="exp",
            max_ngram_order=order,
        ).score
        / 100.0
        for row in flat
    ]
    return np.asarray(values, dtype=np.float64).reshape(s.shape[:-1])


def sacrebleu_bleu(predictions: Sequence[str], references: Sequence[str], *, max_order: int = 4) -> dict[str, float]:
    """Comparable corpus BLEU-1..max_order in [0, 1] (keys `bleu_1_13a`..): = sacrebleu `BLEU(max_ngram_order=n)
    .corpus_score(predictions, [references]).score / 100`."""
    total = sacrebleu_stats(predictions, references, max_order=max_order).sum(axis=0)
    return {
        f"bleu_{k}_13a": float(sacrebleu_from_stats(total, k, max_order=max_order)) for k in range(1, max_order + 1)
    }


# --------------------------------------------------------------------------------------------- ROUGE-L
@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"])  # rouge-score's defaults: its tokenizer, no stemming


def rouge_l_per_sample(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """(N,) ROUGE-L F-measures computed by rouge-score with its defaults (`RougeScorer(["rougeL"])`: lowercase,
    non-alphanumerics dropped, no stemming): the comparable figure, and the project's only ROUGE-L."""
    _check_pairs(predictions, references, "rouge_l")
    _check_texts(predictions, "predictions", "rouge_l")
    _check_texts(references, "references", "rouge_l")
    scorer = _rouge_scorer()
    return np.array(
        [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)],
        dtype=np.float64,
    )


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean per-sample ROUGE-L F-measure (rouge-score's default settings)."""
    return float(rouge_l_per_sample(predictions, references).mean())


# --------------------------------------------------------------------------------------------- F1 machinery
def f1_counts(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(N, L) bool predictions and references -> (N, L, 3) counts [TP, FP, FN]."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    return np.stack([pred & ref, pred & ~ref, ~pred & ref], axis=-1).astype(np.int64)


def f1_from_counts(counts: np.ndarray, average: Average, *, zero_division: float | None = None) -> np.ndarray:
    """Summed counts (..., L, 3) -> micro / macro F1 (...) or per-label F1 (..., L) for average="none".

    Undefined F1 (no TP, FP nor FN): `zero_division`, or with None, NaN and left out of the macro mean.
    """
    c = np.asarray(counts, dtype=np.float64)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]  # (..., L)
    if average == "micro":
        tp, fp, fn = tp.sum(-1), fp.sum(-1), fn.sum(-1)
    elif average not in ("macro", "none"):
        raise ValueError(f"average must be 'micro', 'macro' or 'none', got {average!r}")
    denom = 2 * tp + fp + fn
    defined = denom > 0
    f1 = np.where(defined, 2 * tp / np.where(defined, denom, 1.0), np.nan if zero_division is None else zero_division)
    if average != "macro":
        return f1
    if zero_division is not None:
        return f1.mean(-1)
    n_defined = defined.sum(-1)  # nanmean without its all-NaN warning
    return np.where(n_defined > 0, np.where(defined, f1, 0.0).sum(-1) / np.maximum(n_defined, 1), np.nan)


def _f1_finalize(summed: np.ndarray, n_labels: int, average: Average, zero_division: float | None) -> np.ndarray:
    return f1_from_counts(summed.reshape(summed.shape[:-1] + (n_labels, 3)), average, zero_division=zero_division)


def _f1_metric(counts: np.ndarray, average: Average, zero_division: float | None) -> SummedStats:
    n, n_labels, _ = counts.shape
    finalize = functools.partial(_f1_finalize, n_labels=n_labels, average=average, zero_division=zero_division)
    return SummedStats(counts.reshape(n, n_labels * 3), finalize)


def _f1_report(counts: np.ndarray, names: Sequence[str], prefix: str, zero_division: float | None) -> dict[str, float]:
    """Per-label F1 and support (reference positives) from (N, L, 3) counts."""
    summed = counts.sum(axis=0)  # (L, 3)
    per_label = f1_from_counts(summed, "none", zero_division=zero_division)
    out = {f"{prefix}f1/{name}": float(f) for name, f in zip(names, per_label, strict=True)}
    out.update({f"{prefix}support/{name}": float(tp + fn) for name, (tp, _, fn) in zip(names, summed, strict=True)})
    return out


# --------------------------------------------------------------------------------------------- CheXpert
def _chexpert_prediction(pred: Any) -> dict[str, str] | None:
    """A usable prediction dict, or None when invalid (None, not a dict, a value outside CHEXPERT_VALUES)."""
    if not isinstance(pred, Mapping) or any(v not in CHEXPERT_VALUES for v in pred.values()):
        return None
    return dict(pred)


def _chexpert_reference(ref: Any, i: int) -> dict[str, str]:
    if not isinstance(ref, Mapping):
        raise ValueError(f"chexpert: references[{i}] is {type(ref).__name__}, expected a dict (invalid reference?)")
    bad = sorted(str(k) for k, v in ref.items() if v not in CHEXPERT_VALUES)
    if bad:
        raise ValueError(f"chexpert: references[{i}] has values not in {CHEXPERT_VALUES} for {bad}")
    return dict(ref)


def chexpert_positive(
    dicts: Sequence[Mapping[str, str] | None], convention: Convention, labels: Sequence[str] = CHEXPERT_LABELS
) -> np.ndarray:
    """(N, L) bool: label is positive under `convention` (None rows: all False)."""
    if convention not in _POSITIVE_VALUES:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    positive = _POSITIVE_VALUES[convention]
    return np.array([[d is not None and d.get(k) in positive for k in labels] for d in dicts], dtype=bool).reshape(
        len(dicts), len(labels)
    )


def _chexpert_inputs(
    predictions: Sequence[Mapping[str, str] | None], references: Sequence[Mapping[str, str]]
) -> tuple[list[dict[str, str] | None], list[dict[str, str]]]:
    _check_pairs(predictions, references, "chexpert")
    return [_chexpert_prediction(p) for p in predictions], [_chexpert_reference(r, i) for i, r in enumerate(references)]


def chexpert_scores(
    predictions: Sequence[Mapping[str, str] | None],
    references: Sequence[Mapping[str, str]],
    *,
    zero_division: float | None = None,
) -> dict[str, float]:
    """CheXpert F1s under both Uncertain conventions, plus `valid_rate` and `n`.

    Keys, for conv in ("u_pos", "u_neg"): `{conv}/micro_f1`, `{conv}/macro_f1` (14 labels), `{conv}/micro_f1_5`,
    `{conv}/macro_f1_5` (CHEXPERT_5), `{conv}/f1/{label}` and `{conv}/support/{label}` (reference positives).
    """
    preds, refs = _chexpert_inputs(predictions, references)
    out: dict[str, float] = {"n": float(len(refs)), "valid_rate": float(np.mean([p is not None for p in preds]))}
    five = [CHEXPERT_LABELS.index(k) for k in CHEXPERT_5]
    for conv in CONVENTIONS:
        counts = f1_counts(chexpert_positive(preds, conv), chexpert_positive(refs, conv)).sum(axis=0)  # (14, 3)
        out[f"{conv}/micro_f1"] = float(f1_from_counts(counts, "micro", zero_division=zero_division))
        out[f"{conv}/macro_f1"] = float(f1_from_counts(counts, "macro", zero_division=zero_division))
        out[f"{conv}/micro_f1_5"] = float(f1_from_counts(counts[five], "micro", zero_division=zero_division))
        out[f"{conv}/macro_f1_5"] = float(f1_from_counts(counts[five], "macro", zero_division=zero_division))
        out.update(_f1_report(counts[None], CHEXPERT_LABELS, f"{conv}/", zero_division))
    return out


def chexpert_majority_baseline(references: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The constant prediction of each label's most frequent value in `references` (a label mostly absent is omitted).

    "Absent" competes as a value; ties go to the least positive: absent, then Negative, Uncertain, Positive.
    Score it with `chexpert_scores([baseline] * len(test_refs), test_refs)`.
    """
    refs = [_chexpert_reference(r, i) for i, r in enumerate(references)]
    if not refs:
        raise ValueError("chexpert_majority_baseline: no references")
    preference: tuple[str | None, ...] = (None, "Negative", "Uncertain", "Positive")
    baseline: dict[str, str] = {}
    for label in CHEXPERT_LABELS:
        counts = Counter(r.get(label) for r in refs)
        best = max(preference, key=lambda v: (counts[v], -preference.index(v)))
        if best is not None:
            baseline[label] = best
    return baseline


def chexpert_f1_metric(
    predictions: Sequence[Mapping[str, str] | None],
    references: Sequence[Mapping[str, str]],
    *,
    convention: Convention = "u_pos",
    labels: Sequence[str] = CHEXPERT_LABELS,
    average: Literal["micro", "macro"] = "micro",
    zero_division: float | None = None,
) -> SummedStats:
    """CheXpert micro/macro F1 over `labels` (e.g. CHEXPERT_5) as per-study statistics, for the stats module."""
    preds, refs = _chexpert_inputs(predictions, references)
    counts = f1_counts(chexpert_positive(preds, convention, labels), chexpert_positive(refs, convention, labels))
    return _f1_metric(counts, average, zero_division)


# --------------------------------------------------------------------------------------------- ICD
def _icd_prediction(pred: Any) -> dict[str, bool] | None:
    if not isinstance(pred, Mapping):
        return None
    if dict(pred) == ICD_NONE:
        return {}
    if any(not isinstance(v, bool) for v in pred.values()):
        return None
    return {str(k): v for k, v in pred.items()}


def _icd_reference(ref: Any, i: int) -> dict[str, bool]:
    out = _icd_prediction(ref)
    if out is None:
        raise ValueError(f"icd: references[{i}] is not a dict of booleans (or {ICD_NONE}): invalid reference")
    return out


def icd_flag_set(references: Sequence[Mapping[str, bool]]) -> tuple[str, ...]:
    """records.ICD_FLAGS, then the other flags named in `references` (sorted)."""
    seen = {k for i, r in enumerate(references) for k in _icd_reference(r, i)}
    return ICD_FLAGS + tuple(sorted(seen - set(ICD_FLAGS)))


def _icd_counts(
    predictions: Sequence[Mapping[str, bool] | None],
    references: Sequence[Mapping[str, bool]],
    flags: Sequence[str] | None,
) -> tuple[np.ndarray, list[dict[str, bool] | None], tuple[str, ...]]:
    _check_pairs(predictions, references, "icd")
    refs = [_icd_reference(r, i) for i, r in enumerate(references)]
    preds = [_icd_prediction(p) for p in predictions]
    names = tuple(flags) if flags is not None else icd_flag_set(refs)
    pred_m = np.array([[p is not None and p.get(f) is True for f in names] for p in preds], dtype=bool)
    ref_m = np.array([[r.get(f) is True for f in names] for r in refs], dtype=bool)
    return f1_counts(pred_m.reshape(len(preds), len(names)), ref_m.reshape(len(refs), len(names))), preds, names


def icd_scores(
    predictions: Sequence[Mapping[str, bool] | None],
    references: Sequence[Mapping[str, bool]],
    *,
    flags: Sequence[str] | None = None,
    zero_division: float | None = None,
) -> dict[str, float]:
    """ICD `micro_f1`, `macro_f1`, `f1/{flag}`, `support/{flag}`, `valid_rate` and `n` (flags: see module docstring)."""
    counts, preds, names = _icd_counts(predictions, references, flags)
    summed = counts.sum(axis=0)
    out: dict[str, float] = {"n": float(len(preds)), "valid_rate": float(np.mean([p is not None for p in preds]))}
    out["micro_f1"] = float(f1_from_counts(summed, "micro", zero_division=zero_division))
    out["macro_f1"] = float(f1_from_counts(summed, "macro", zero_division=zero_division))
    out.update(_f1_report(counts, names, "", zero_division))
    return out


def icd_f1_metric(
    predictions: Sequence[Mapping[str, bool] | None],
    references: Sequence[Mapping[str, bool]],
    *,
    flags: Sequence[str] | None = None,
    average: Literal["micro", "macro"] = "micro",
    zero_division: float | None = None,
) -> SummedStats:
    """ICD micro/macro F1 as per-study statistics, for the stats module."""
    counts, _, _ = _icd_counts(predictions, references, flags)
    return _f1_metric(counts, average, zero_division)


# --------------------------------------------------------------------------------------------- text / rate metrics
def bleu_metric(
    predictions: Sequence[str], references: Sequence[str], *, order: int = 4, max_order: int = 4
) -> SummedStats:
    """Corpus BLEU-`order` as per-study statistics (resampling recomputes the corpus score)."""
    stats = bleu_stats(predictions, references, max_order=max_order)
    return SummedStats(stats, functools.partial(bleu_from_stats, order=order, max_order=max_order))


def _mean_finalize(summed: np.ndarray) -> np.ndarray:
    return summed[..., 0] / summed[..., 1]


def mean_metric(values: Sequence[float] | np.ndarray) -> SummedStats:
    """The mean of per-study values (ROUGE-L F, validity as 0/1, ...) as per-study statistics [value, 1]."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not v.size:
        raise ValueError("mean_metric: no values")
    return SummedStats(np.stack([v, np.ones_like(v)], axis=1), _mean_finalize)


def sacrebleu_metric(
    predictions: Sequence[str], references: Sequence[str], *, order: int = 4, max_order: int = 4
) -> SummedStats:
    """Comparable (sacrebleu 13a) corpus BLEU-`order` as per-study statistics."""
    stats = sacrebleu_stats(predictions, references, max_order=max_order)
    return SummedStats(stats, functools.partial(sacrebleu_from_stats, order=order, max_order=max_order))


def rouge_l_metric(predictions: Sequence[str], references: Sequence[str]) -> SummedStats:
    """Mean ROUGE-L F-measure as per-study statistics."""
    return mean_metric(rouge_l_per_sample(predictions, references))


# --------------------------------------------------------------------------------------------- evaluate modules
def metric_path(name: str) -> Path:
    """The local `evaluate` module file of metric `name` (one of METRIC_NAMES)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; this project ships {METRIC_NAMES}")
    return _METRICS_DIR / f"{name}.py"


def load_metric(name: str, **load_kwargs: Any) -> evaluate.EvaluationModule:
    """`evaluate.load` on the module file shipped here: works offline (HF_HUB_OFFLINE=1), never touches the hub.

    Importing `evaluate` is slow, so it happens here, not at module import.
    """
    import evaluate

    return evaluate.load(str(metric_path(name)), **load_kwargs)

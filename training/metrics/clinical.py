"""Clinical metrics on the Impression text, as report-generation papers publish them: CheXbert labeler F1, RadGraph F1
and BERTScore. Weights come only from local directories, never from a hub at run time.

    pip install -e ".[clinical-metrics]"
    launcher evaluate ... --chexbert weights/chexbert --bertscore-model weights/distilroberta-base

- CheXbert F1 (`CheXbertLabeler`): the CheXbert labeler (Smit et al. 2020) run on the generated and on the reference
  Impression; its 14 outputs become a CheXpert dict (blank -> label absent) and are scored by the project's one F1
  implementation (`scores.chexpert_f1_metric`): 14 labels and the 5 competition labels, micro and macro, Uncertain as
  negative (u_neg, what MAIRA-2 / LLaVA-Rad / CheXagent tables report) and as positive (u_pos). The f1chexbert
  package hard-codes hub downloads (`BertTokenizer.from_pretrained('bert-base-uncased')`, `AutoConfig` of the same,
  chexbert.pth fetched into an appdirs cache) and cannot be pointed at a directory, so the labeler is loaded here with
  transformers' BertModel and the checkpoint's own head layout (13 heads of 4 classes + 1 of 2), which is all that
  package does. Directory: chexbert.pth (hf.co/StanfordAIMI/RRG_scorers) plus bert-base-uncased's config.json,
  vocab.txt and tokenizer_config.json (hf.co/google-bert/bert-base-uncased).
- RadGraph F1 (`radgraph_f1_per_sample`): the radgraph package's `F1RadGraph(reward_level="partial")`, the variant
  LLaVA-Rad / MAIRA-2 / RadEval report, with `model_cache_dir` pointing at the local directory (it downloads only when
  `DIR/<model_type>/` is missing or empty, which this module refuses first). Directory: `DIR/radgraph/` holding the
  extracted radgraph.tar.gz (hf.co/StanfordAIMI/RRG_scorers: config.json, vocabulary/, weights.th), whose config names
  its BERT encoder; that encoder must be in the local HF cache or the config must name a local directory.
  radgraph 0.1.18 (the latest) cannot run beside this project's transformers 5.24: its vendored allennlp calls
  `tokenizer.encode_plus`, which transformers 5 removed (measured: AttributeError while building the embedder). So
  it is not in the `clinical-metrics` extra, and `--radgraph` is refused with that reason (`radgraph_unavailable`)
  rather than crashing after generation; in an environment with transformers < 5 and `pip install radgraph==0.1.18`
  the same function runs.
- BERTScore (`bertscore_f1_per_sample`): the bert-score package's `BERTScorer(model_type=DIR, num_layers=L)` (a
  local transformers directory loads offline), F1 without idf or baseline rescaling. bert-score 0.3.13 crashes on an
  empty sentence under transformers 5 (`build_inputs_with_special_tokens` is gone); its documented result for an empty
  side is 0, so empty pairs get 0 here and only non-empty pairs go to the scorer. Layer: bert-score's own table for
  the directory's name (e.g. distilroberta-base -> 5, roberta-large -> 17), else the model's last layer.

Without a directory a metric is skipped with one line naming what to download and where to put it (`SKIP_HELP`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasets_io.records import CHEXPERT_5, CHEXPERT_LABELS
from training.metrics import scores

# The CheXbert heads in the checkpoint's order, and what each output class means (f1chexbert / CheXbert label.py):
# heads 0..12 have 4 classes (blank, positive, negative, uncertain), the No Finding head 2 (blank, positive).
CHEXBERT_HEADS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
CHEXBERT_CLASSES: tuple[str | None, ...] = (None, "Positive", "Negative", "Uncertain")
CHEXBERT_FILE = "chexbert.pth"
RADGRAPH_MODEL_TYPE = "radgraph"

SKIP_HELP = {
    "chexbert": "CheXbert F1 skipped: download chexbert.pth (hf.co/StanfordAIMI/RRG_scorers) and bert-base-uncased's "
    "config.json, vocab.txt, tokenizer_config.json (hf.co/google-bert/bert-base-uncased) into one "
    "directory and pass --chexbert DIR",
    "radgraph": "RadGraph F1 skipped: extract radgraph.tar.gz (hf.co/StanfordAIMI/RRG_scorers) into DIR/radgraph/ "
    "(config.json, vocabulary/, weights.th) and pass --radgraph DIR in an environment where radgraph "
    "runs (transformers < 5, pip install radgraph==0.1.18)",
    "bertscore": "BERTScore skipped: download a transformers model directory (e.g. hf.co/distilbert/distilroberta-base:"
    " config.json, model.safetensors, tokenizer files) and pass --bertscore-model DIR",
}


def chexbert_dict(classes: Sequence[int]) -> dict[str, str]:
    """14 CheXbert output classes (head order) -> a CheXpert dict; a blank output leaves the label out."""
    if len(classes) != len(CHEXBERT_HEADS):
        raise ValueError(f"CheXbert gives {len(CHEXBERT_HEADS)} outputs, got {len(classes)}")
    out = {}
    for label, c in zip(CHEXBERT_HEADS, classes, strict=True):
        value = CHEXBERT_CLASSES[int(c)]
        if value is not None:
            out[label] = value
    return out


# --------------------------------------------------------------------------------------------- CheXbert
def _chexbert_net(config: Any) -> Any:
    """The labeler: BERT, then one linear head per label on the [CLS] state (names as in chexbert.pth)."""
    import torch
    from transformers import BertModel

    class CheXbertNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config)
            h = config.hidden_size
            heads = [torch.nn.Linear(h, 4) for _ in range(13)] + [torch.nn.Linear(h, 2)]
            self.linear_heads = torch.nn.ModuleList(heads)

        def forward(self, ids: Any, mask: Any) -> list[Any]:
            cls = self.bert(ids, attention_mask=mask).last_hidden_state[:, 0]  # (B, H)
            return [head(cls) for head in self.linear_heads]  # 14 x (B, 4 or 2)

    return CheXbertNet()


class CheXbertLabeler:
    """The CheXbert labeler loaded from a local directory (see the module docstring for the files)."""

    def __init__(self, directory: str | Path, device: str = "cpu", batch_size: int = 16) -> None:
        import torch
        from transformers import AutoTokenizer, BertConfig

        d = Path(directory)
        missing = [f for f in (CHEXBERT_FILE, "config.json", "vocab.txt") if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"--chexbert {d}: missing {', '.join(missing)} ({SKIP_HELP['chexbert']})")
        self.tokenizer = AutoTokenizer.from_pretrained(str(d))
        self.net = _chexbert_net(BertConfig.from_pretrained(str(d)))
        state = torch.load(d / CHEXBERT_FILE, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.get("model_state_dict", state).items()}
        result = self.net.load_state_dict(state, strict=False)
        unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
        if result.missing_keys or unexpected:  # a wrong file must not label with random heads
            raise ValueError(
                f"{d / CHEXBERT_FILE}: not a CheXbert checkpoint (missing {result.missing_keys[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        self.net.to(device).eval()
        self.device, self.batch_size = device, batch_size
        self._cache: dict[str, np.ndarray] = {}  # text -> classes: references are labelled once for every arm

    def classes(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 14) argmax classes. Text as f1chexbert prepares it: whitespace collapsed, at most 512 tokens."""
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            chunk = [" ".join((t or "").split()) for t in texts[i : i + self.batch_size]]
            enc = self.tokenizer(chunk, truncation=True, max_length=512, padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = self.net(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            out.append(torch.stack([x.argmax(dim=1) for x in logits], dim=1).cpu().numpy())  # (B, 14)
        return np.concatenate(out) if out else np.zeros((0, len(CHEXBERT_HEADS)), dtype=np.int64)

    def label(self, texts: Sequence[str]) -> list[dict[str, str]]:
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new:
            self._cache.update(zip(new, self.classes(new), strict=True))
        return [chexbert_dict(self._cache[t]) for t in texts]


def chexbert_stats(pred_labels: Sequence[dict[str, str]], ref_labels: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Labeler F1s as SummedStats, keyed like the structured-block ones: chexbert/{u_neg,u_pos}/{micro,macro}_f1[_5]."""
    out = {}
    for conv in scores.CONVENTIONS:
        for labels, suffix in ((CHEXPERT_LABELS, ""), (CHEXPERT_5, "_5")):
            for avg in ("micro", "macro"):
                out[f"chexbert/{conv}/{avg}_f1{suffix}"] = scores.chexpert_f1_metric(
                    pred_labels, ref_labels, convention=conv, labels=labels, average=avg
                )
    return out


# --------------------------------------------------------------------------------------------- BERTScore
def bertscore_layer(directory: str | Path) -> int:
    """bert-score's recommended layer for a model of this directory's name, else the model's last layer."""
    from bert_score.utils import model2layers
    from transformers import AutoConfig

    name = Path(directory).name
    if name in model2layers:
        return int(model2layers[name])
    return int(AutoConfig.from_pretrained(str(directory)).num_hidden_layers)


def check_bertscore_dir(directory: str | Path) -> None:
    if not Path(directory, "config.json").is_file():
        raise FileNotFoundError(f"--bertscore-model {directory}: no config.json ({SKIP_HELP['bertscore']})")


@functools.lru_cache(maxsize=2)
def _bert_scorer(directory: str, layer: int, device: str) -> Any:
    from bert_score import BERTScorer

    return BERTScorer(model_type=directory, num_layers=layer, device=device)


def bertscore_f1_per_sample(
    predictions: Sequence[str],
    references: Sequence[str],
    directory: str | Path,
    *,
    layer: int | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """(N,) BERTScore F1 (no idf, no rescaling); 0 where either side is empty (bert-score's own convention)."""
    check_bertscore_dir(directory)
    out = np.zeros(len(predictions), dtype=np.float64)
    keep = [i for i, (p, r) in enumerate(zip(predictions, references, strict=True)) if p.strip() and r.strip()]
    if keep:
        scorer = _bert_scorer(str(directory), layer or bertscore_layer(directory), device)
        _, _, f1 = scorer.score([predictions[i] for i in keep], [references[i] for i in keep], verbose=False)
        out[keep] = f1.double().numpy()
    return out


# --------------------------------------------------------------------------------------------- RadGraph
def radgraph_unavailable() -> str | None:
    """Why RadGraph F1 cannot run in this environment (None when it can)."""
    from transformers import PreTrainedTokenizerBase

    try:
        import radgraph  # noqa: F401
    except ImportError:
        return "the radgraph package is not installed (pip install radgraph==0.1.18, with transformers < 5)"
    if not hasattr(PreTrainedTokenizerBase, "encode_plus"):
        return (
            "radgraph's vendored allennlp calls tokenizer.encode_plus, which this transformers "
            "(>= 5) no longer has: compute RadGraph F1 in an environment with transformers < 5"
        )
    return None


def check_radgraph_dir(directory: str | Path) -> None:
    model_dir = Path(directory) / RADGRAPH_MODEL_TYPE
    if not model_dir.is_dir() or not any(model_dir.iterdir()):  # radgraph would download into it otherwise
        raise FileNotFoundError(f"--radgraph {directory}: no {model_dir} ({SKIP_HELP['radgraph']})")
    if why := radgraph_unavailable():
        raise RuntimeError(f"--radgraph {directory}: RadGraph F1 cannot run here: {why}")


def radgraph_f1_per_sample(
    predictions: Sequence[str], references: Sequence[str], directory: str | Path, *, device: str = "cpu"
) -> np.ndarray:
    """(N,) RadGraph partial-reward F1 per sample (radgraph's F1RadGraph, reward_level="partial")."""
    check_radgraph_dir(directory)
    from radgraph import F1RadGraph

    f1 = F1RadGraph(
        reward_level="partial",
        model_type=RADGRAPH_MODEL_TYPE,
        model_cache_dir=str(directory),
        cuda=0 if device.startswith("cuda") else -1,
    )
    _, per_sample, _, _ = f1(hyps=list(predictions), refs=list(references))
    return np.asarray(per_sample, dtype=np.float64)


# --------------------------------------------------------------------------------------------- together
@dataclass
class ClinicalScorers:
    """The clinical metrics whose weights were given; `skipped` holds one line per metric that was not."""

    chexbert: CheXbertLabeler | None = None
    radgraph_dir: str | None = None
    bertscore_dir: str | None = None
    device: str = "cpu"
    skipped: tuple[str, ...] = ()

    @classmethod
    def load(
        cls, chexbert: str | None, radgraph: str | None, bertscore_model: str | None, device: str = "cpu"
    ) -> ClinicalScorers:
        """Checks every directory given up front, before any generation (a bad one is an error, not a late crash)."""
        skipped = [
            SKIP_HELP[name]
            for name, d in (("chexbert", chexbert), ("radgraph", radgraph), ("bertscore", bertscore_model))
            if not d
        ]
        if radgraph:
            check_radgraph_dir(radgraph)
        if bertscore_model:
            check_bertscore_dir(bertscore_model)
        labeler = CheXbertLabeler(chexbert, device) if chexbert else None
        return cls(labeler, radgraph, bertscore_model, device, tuple(skipped))

    @property
    def active(self) -> bool:
        return bool(self.chexbert or self.radgraph_dir or self.bertscore_dir)

    def stats(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
        """Metric name (under clinical/) -> SummedStats, on Impression texts."""
        out: dict[str, Any] = {}
        if self.chexbert:
            labels = self.chexbert.label([*predictions, *references])
            n = len(predictions)
            out.update({f"clinical/{k}": v for k, v in chexbert_stats(labels[:n], labels[n:]).items()})
        if self.radgraph_dir:
            out["clinical/radgraph_f1"] = scores.mean_metric(
                radgraph_f1_per_sample(predictions, references, self.radgraph_dir, device=self.device)
            )
        if self.bertscore_dir:
            out["clinical/bertscore_f1"] = scores.mean_metric(
                bertscore_f1_per_sample(predictions, references, self.bertscore_dir, device=self.device)
            )
        return out

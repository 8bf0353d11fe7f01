"""The tiny model's tokenizer: byte-level BPE trained on the training corpus, with two choices that decide whether a
tiny model can learn this task (see README "What the tiny model learns, and the choices that decide it"):

- numbers split into single digits, so "BNP 2693" is read digit by digit and a threshold rule is learnable
  (multi-digit chunks act as per-row keys and the model memorizes instead);
- frequent fixed LINES become single tokens, which about halves sequence length: lines of the JSON blocks
  (`  "Cardiomegaly": "Negative",`), the number-free prefixes of lines with numbers (`      "value": `) and
  impression sentences. Nothing longer than a line is merged: text that spans several Patient Data lines (e.g. from
  one measurement to the next) fits one generator's field order and missing-field pattern only (a recipe that
  merged it learned almost nothing from the EHR of an independently written generator, issue 17). So each
  measurement is read as a naming line, a `"value": ` token and its digits. A digit glued to a word (`spo2`,
  `O2_device`) is part of a name, not a number.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
IMAGE_TOKEN = "<image>"
_DIGIT = re.compile(r"\d")
_NUMBER = re.compile(r"(?<![A-Za-z_])\d")  # the start of a number; `spo2` holds a digit but no number


def phrase_candidates(texts: Iterable[str], min_count: int, max_phrases: int) -> list[str]:
    """Frequent newline-prefixed lines (and the number-free prefixes of lines with numbers) and impression
    sentences; never text across lines of the Patient Data block."""
    counts: Counter[str] = Counter()
    for text in texts:
        for line in text.split("\n"):
            m = _NUMBER.search(line)
            piece = line if m is None else line[: m.start()]
            if piece.strip():
                counts["\n" + piece] += 1
            if line.startswith("Impression: "):
                for sentence in re.split(r"(?<=\.) ", line[len("Impression: ") :]):
                    if sentence and not _DIGIT.search(sentence):
                        counts[sentence] += 1
    for p in [p for p in counts if p.endswith(",") and counts.get(p[:-1], 0) >= min_count]:
        counts[p[:-1]] += counts.pop(p)  # an item of a variable-length list (ICD flags): "is it there" and "is
        # another one coming" are separate predictions, so the comma stays a token of its own
    frequent = [p for p, c in counts.most_common() if c >= min_count]
    return frequent[:max_phrases]


def train_tokenizer(texts: list[str], vocab_size: int, min_phrase_count: int = 8, max_phrases: int = 600):
    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL.values(), IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    phrases = phrase_candidates(texts, min_phrase_count, max_phrases)
    tok.add_tokens([AddedToken(p, normalized=False, single_word=False) for p in phrases])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL, extra_special_tokens={"image_token": IMAGE_TOKEN})
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast

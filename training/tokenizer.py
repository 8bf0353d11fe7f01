"""The tiny model's tokenizer: byte-level BPE trained on the training corpus, with two choices that decide whether a
tiny model can learn this task (see README "What the tiny model learns, and the choices that decide it"):

- numbers split into single digits, so "BNP 2693" is read digit by digit and a threshold rule is learnable
  (multi-digit chunks act as per-row keys and the model memorizes instead);
- frequent fixed text becomes single tokens, which more than halves sequence length: lines of the JSON blocks
  (`  "Cardiomegaly": "Negative",`), their number-free prefixes (`      "value": `), and the recurring text between
  two measurements of the Patient Data block (`,\n      "unit": "bpm"\n    },\n    "temperature": {\n      "value": `,
  reference ranges included: a recurring array of numbers is a constant, not a measurement). So each measurement is
  read as its digits after one token that names it. A digit glued to a word (`spo2`, `O2_device`) is part of a name,
  not a number.
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
_MEASUREMENT = re.compile(r"(?<![A-Za-z_\d.])-?\d+(?:\.\d+)?(?![\d.])")
_NUMBER_ARRAY = re.compile(r"\[[\d.,\s-]*\]")


def between_measurements(text: str) -> list[str]:
    """The text before, between and after the numbers of a text that has any (the tail stops at the image
    placeholder); numbers inside `[...]` arrays (reference ranges) do not count as measurements."""
    arrays = [m.span() for m in _NUMBER_ARRAY.finditer(text)]
    cuts = [m.span() for m in _MEASUREMENT.finditer(text) if not any(a <= m.start() < b for a, b in arrays)]
    if not cuts:
        return []
    pieces, prev = [], 0
    for start, end in cuts:
        pieces.append(text[prev:start])
        prev = end
    pieces.append(text[prev:].split(IMAGE_TOKEN)[0])
    return [p for p in pieces if p.strip() and IMAGE_TOKEN not in p]


def phrase_candidates(texts: Iterable[str], min_count: int, max_phrases: int) -> list[str]:
    """Frequent newline-prefixed lines (and the number-free prefixes of lines with numbers), the text between
    measurements, and impression sentences."""
    counts: Counter[str] = Counter()
    pieces: Counter[str] = Counter()
    for text in texts:
        pieces.update(between_measurements(text))
        for line in text.split("\n"):
            m = _NUMBER.search(line)
            piece = line if m is None else line[: m.start()]
            if piece.strip():
                counts["\n" + piece] += 1
            if line.startswith("Impression: "):
                for sentence in re.split(r"(?<=\.) ", line[len("Impression: ") :]):
                    if sentence and not _DIGIT.search(sentence):
                        counts[sentence] += 1
    for piece, c in pieces.items():  # a rare piece (an uncommon tail) still gives its frequent leading lines
        if c >= min_count:
            counts[piece] += c
        else:
            for cut in (i for i, ch in enumerate(piece) if ch == "\n" and i > 0):
                counts[piece[:cut]] += c
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

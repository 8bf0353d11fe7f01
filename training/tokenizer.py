"""The tiny model's tokenizer: byte-level BPE trained on the training corpus, with two choices that decide whether a
tiny model can learn this task (see README "What the tiny model learns"):

- numbers split into single digits, so "BNP 2693" is read digit by digit and a threshold rule is learnable
  (multi-digit chunks act as per-row keys and the model memorizes instead);
- frequent fixed lines of the JSON blocks (`  "Cardiomegaly": "Negative",`) and their digit-free prefixes
  (`      "value": `) become single tokens, which halves sequence length.
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


def phrase_candidates(texts: Iterable[str], min_count: int, max_phrases: int) -> list[str]:
    """Frequent newline-prefixed lines (and the digit-free prefixes of lines with numbers) and impression sentences."""
    counts: Counter[str] = Counter()
    for text in texts:
        for line in text.split("\n"):
            m = _DIGIT.search(line)
            piece = line if m is None else line[: m.start()]
            if len(piece.strip()) >= 2:
                counts["\n" + piece] += 1
            if line.startswith("Impression: "):
                for sentence in re.split(r"(?<=\.) ", line[len("Impression: ") :]):
                    if sentence and not _DIGIT.search(sentence):
                        counts[sentence] += 1
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

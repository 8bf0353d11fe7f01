"""The token budget of configs/llava_med_7b.yaml (576 image tokens, data.max_seq_len 2048) on MIMIC-size synthetic data.

    python benchmarks/token_budget_7b.py                 # 1,200 studies of `synth --ehr-detail mimic` (~1 min)
    python benchmarks/token_budget_7b.py --studies 3000 --max-len 2048

The real Mistral tokenizer cannot be loaded here (no hub), so two stand-ins, both run through the same
datasets_io.token_budget.budget_report training runs before its first step:
- `tiny`: the tiny BPE trained on the curriculum (what a tiny run uses). It learns the fixed JSON text of the Patient
  Data block as single tokens, so it UNDER-states the block several-fold;
- `pretokens`: one token per pre-token (words, punctuation runs, whitespace runs, every digit alone), plus the
  Mistral-instruct template's `[INST]`/`[/INST]` and BOS. Mistral's SentencePiece also splits digits one by one and
  splits rare words (NT-proBNP, mmHg) further, so this is near, and rather under, what Mistral counts. The
  `[INST] ... [/INST]` user turn is included.
Prints the report of each (the format of `launcher data validate --config`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_TOKENS = 576  # (336 / 14) ** 2, LLaVA-Med v1.5's CLIP ViT-L/14-336


class PretokenCounter:
    """A tokenizer stand-in: ids are placeholders, only their count matters (budget_report measures lengths)."""

    bos_token, eos_token_id, chat_template = "<s>", 0, "mistral-instruct"

    def __init__(self):
        from tokenizers import pre_tokenizers

        self.pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1] * len(self.pre.pre_tokenize_str(text))}

    def apply_chat_template(self, messages: list[dict], tokenize: bool, add_generation_prompt: bool) -> str:
        return f"<s>[INST] {messages[0]['content']} [/INST]"  # Mistral-instruct's user turn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=1200)
    ap.add_argument("--max-len", type=int, default=2048)
    args = ap.parse_args()

    from datasets_io.jsonl import read_records
    from datasets_io.synth import write_synthetic
    from datasets_io.token_budget import budget_report
    from training.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(tmp, args.studies, 0, image_size=(32, 32), progress=False, ehr_detail="mimic")
        records, _ = read_records(str(Path(tmp) / "curriculum_train.jsonl"), tmp, check_images="none")
    tiny = train_tokenizer([t for r in records for t in (r.prompt, r.target)], 1024)
    counter = PretokenCounter()
    for name, tok, image_id in (("tiny", tiny, tiny.convert_tokens_to_ids("<image>")), ("pretokens", counter, -1)):
        report = budget_report(records, tok, image_id, IMAGE_TOKENS, args.max_len)
        print(f"== {name}")
        print("\n".join(report.lines()))


if __name__ == "__main__":
    main()

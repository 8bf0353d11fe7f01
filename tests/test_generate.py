"""Greedy generation (left padded, batched) and the report parser, on a tiny model built from config (no download)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, tiny_overrides
from datasets_io.records import prompt_a, prompt_b, target_b, with_empty_ehr


@pytest.fixture(scope="module")
def bundle(synth_dir, tmp_path_factory):
    """A random tiny LLaVA + LoRA (untrained: generation runs to max_new_tokens, the hardest case for padding)."""
    from datasets_io.config import load_config
    from launcher.local import corpus_texts, load_run_data
    from training.model import build_model

    cfg = load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(synth_dir, tmp_path_factory.mktemp("gen")))
    torch.manual_seed(0)
    b = build_model(cfg, corpus_texts(load_run_data(cfg)))
    b.model.eval()
    return b


@pytest.fixture(scope="module")
def val_items(synth_dir):
    """(prompt, image bytes) of val rows: Stage A and B prompts and an emptied-EHR one, so lengths differ."""
    from datasets_io.jsonl import join, read_bytes, read_records

    rows, _ = read_records(str(synth_dir / "curriculum_val.jsonl"), str(synth_dir))
    a = next(r for r in rows if r.stage == "A")
    bs = [r for r in rows if r.stage == "B"][:2]
    items = [(r.prompt, read_bytes(join(str(synth_dir), r.image))) for r in [a, *bs]]
    items.append((with_empty_ehr(bs[0].prompt), items[1][1]))
    return items


def test_batched_generation_equals_batch_size_one(bundle, val_items):
    from training.generate import encode_batch, generate_reports

    batch = encode_batch(bundle, [p for p, _ in val_items], [_pixels(bundle, im) for _, im in val_items])
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different lengths must be left padded"
    assert (batch["attention_mask"][:, -1] == 1).all()
    batched = generate_reports(bundle, val_items, batch_size=len(val_items), max_new_tokens=12)
    single = [generate_reports(bundle, [it], batch_size=1, max_new_tokens=12)[0] for it in val_items]
    assert batched == single
    assert all(isinstance(t, str) and t for t in batched)
    assert "Patient Data" not in batched[1], "only the new tokens are decoded, never the prompt"


def test_decode_stops_at_eos_and_round_trips(bundle):
    from training.generate import decode_new_tokens

    tok = bundle.tokenizer
    target = target_b("No acute findings.", {"No Finding": "Positive"}, {"sepsis": True})
    ids = tok(target, add_special_tokens=False)["input_ids"]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    new = torch.tensor([ids + [eos] + ids[:3], ids[:4] + [eos] + [pad] * (len(ids) - 1)])  # (2, N)
    texts = decode_new_tokens(tok, new)
    assert texts[0] == target  # the tokenizer loses nothing the parser needs
    assert texts[1] == tok.decode(ids[:4])


def test_generate_rejects_bad_arguments(bundle, val_items):
    from training.generate import generate_batch, generate_reports

    with pytest.raises(ValueError, match="batch_size"):
        generate_reports(bundle, val_items, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch(bundle, ["x <image>"], [None], 0)
    with pytest.raises(ValueError, match="1 prompts but 2 images"):
        generate_batch(bundle, ["x <image>"], [None, None], 4)


def test_parse_report_counts_malformed_output_as_invalid():
    from training.generate import parse_report

    good = target_b("Small effusion.", {"Pleural Effusion": "Positive"}, {"pneumonia": True, "sepsis": False})
    assert parse_report(good, expect_icd=True).valid
    assert parse_report(good, expect_icd=True).icd == {"pneumonia": True}
    stage_a_text = good.split("\n\nICD:")[0]
    assert parse_report(stage_a_text, expect_icd=False).valid
    assert not parse_report(stage_a_text, expect_icd=True).valid  # Stage B arms must answer ICD
    broken = [
        None,
        "",
        "   ",
        "<pad><pad>",
        'Impression: x\n\nCheXpert:\n{"Edema": ',
        "{}{}{",
        'Impression: x\n\nCheXpert:\n{"Edema": "Maybe"}\n\nICD:\n{"sepsis": "yes"}',
        "Impression: x\n\nCheXpert:\n[1, 2]\n\nICD:\nnull",
        "\x00\ufffd" * 50,
    ]
    for text in broken:
        parsed = parse_report(text, expect_icd=True)
        assert not parsed.valid and parsed.problems


def test_default_generation_length():
    from training.generate import max_new_tokens_for

    assert max_new_tokens_for(384, 200) == 184
    assert max_new_tokens_for(384, 380) == 16  # never below the floor


def test_predict_reports_prompt_choice(bundle, val_items, monkeypatch):
    """No EHR -> the Stage A prompt (no ICD expected); an EHR dict, even {}, -> the Stage B prompt."""
    import training.generate as g

    seen = []
    stage_a_answer = "Impression: Clear.\n\nCheXpert:\n{}"
    monkeypatch.setattr(
        g, "generate_reports", lambda b, items, **kw: seen.extend(p for p, _ in items) or [stage_a_answer] * len(items)
    )
    image = val_items[0][1]
    out = g.predict_reports(bundle, [(image, None), (image, {}), (image, {"Age": 70})], max_new_tokens=4)
    assert seen == [prompt_a(), prompt_b({}), prompt_b({"Age": 70})]
    assert [o["valid"] for o in out] == [True, False, False]  # a Stage B answer must have an ICD block
    assert set(out[0]) == {"report", "valid", "problems", "impression", "chexpert", "icd"}
    assert out[0]["impression"] == "Clear." and out[0]["icd"] is None and out[1]["problems"] == ["missing ICD block"]
    json.dumps(out)  # plain data


def _pixels(bundle, image):
    from datasets_io.images import preprocess_image

    return preprocess_image(image, bundle.image_spec)

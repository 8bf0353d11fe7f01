"""The image path (draft decode, pad, normalize) and the token path (image expansion, exact label mask)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from datasets_io.images import CLIP_MEAN, CLIP_STD, ImageSpec, load_gray, preprocess_image, preprocess_image_naive
from datasets_io.records import prompt_b, target_b
from datasets_io.tokens import IGNORE_INDEX, build_sample, encode_prompt, pad_batch


def jpeg(h, w, value=128) -> bytes:
    arr = np.full((h, w), value, np.uint8)
    arr[: h // 2] = 255
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_draft_decode_uses_reduced_dct_and_keeps_aspect():
    data = jpeg(3056, 2544)
    opened = []
    real_open = Image.open
    Image.open = lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1]
    try:
        gray = load_gray(data, 336)
    finally:
        Image.open = real_open
    assert opened[0].size == (318, 382)  # decoded at 1/8 scale: the smallest whose longer side is still >= 336
    gray = load_gray(data, 336)
    assert max(gray.size) == 336 and gray.mode == "L"
    assert abs(gray.size[0] / gray.size[1] - 2544 / 3056) < 0.01


def test_pixel_values_are_padded_normalized_three_channels():
    spec = ImageSpec(64)
    px = preprocess_image(jpeg(200, 100, value=0), spec)
    assert px.shape == (3, 64, 64) and px.dtype == np.float32
    # padding columns are the mean colour (LLaVA's expand2square) -> exactly 0 after normalization
    assert np.all(px[:, :, :16] == 0) and np.all(px[:, :, -16:] == 0)
    # top half of the image is white -> (1 - mean) / std
    assert np.allclose(px[0, 5, 32], (1 - CLIP_MEAN[0]) / CLIP_STD[0], atol=0.05)


def test_fast_path_matches_naive_path_closely():
    data = jpeg(1024, 1024)
    fast, naive = preprocess_image(data, ImageSpec(128)), preprocess_image_naive(data, ImageSpec(128))
    assert fast.shape == naive.shape and np.abs(fast - naive).mean() < 0.1


@pytest.fixture(scope="module")
def tokenizer(synth_dir_module):
    from training.tokenizer import train_tokenizer

    rows = [json.loads(l) for l in (synth_dir_module / "curriculum_train.jsonl").read_text().splitlines()]
    return train_tokenizer([r["prompt"] for r in rows] + [r["target"] for r in rows], 600)


@pytest.fixture(scope="module")
def synth_dir_module(tmp_path_factory):
    from datasets_io.synth import write_synthetic

    out = tmp_path_factory.mktemp("tok")
    write_synthetic(out, 30, seed=5, image_size=(32, 32), progress=False)
    return out


EHR = {"Age": 71, "Sex": "F", "Labs": {"BNP": {"value": 2693.0, "unit": "pg/mL", "reference_range": [0, 100]}}}
TARGET = target_b("Moderate cardiomegaly.", {"Cardiomegaly": "Positive"}, {"chf_exacerbation": True})


def test_label_mask_covers_exactly_target_plus_eos(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    s = build_sample(tokenizer, prompt_b(EHR), TARGET, image_token_id=image_id, num_image_tokens=16, max_len=1024)
    assert s.input_ids.count(image_id) == 16
    first = next(i for i, l in enumerate(s.labels) if l != IGNORE_INDEX)
    assert all(l == IGNORE_INDEX for l in s.labels[:first])  # prompt and image tokens masked
    assert s.labels[first:] == s.input_ids[first:]  # labels are the input ids themselves
    assert s.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(s.labels[first:-1]) == TARGET  # decoding the labelled tokens gives back the target
    assert len(s.attention_mask) == len(s.input_ids)


def test_prompt_loss_supervises_the_prompt_text_but_never_image_tokens(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    kw = dict(image_token_id=image_id, num_image_tokens=16, max_len=1024)
    off = build_sample(tokenizer, prompt_b(EHR), TARGET, **kw)
    on = build_sample(tokenizer, prompt_b(EHR), TARGET, prompt_loss=True, **kw)
    assert on.input_ids == off.input_ids and off.prompt_labels is None
    assert on.labels == off.labels  # the target is supervised as before, and is all `labels` holds
    n_prompt = next(i for i, l in enumerate(off.labels) if l != IGNORE_INDEX)
    assert on.prompt_labels[n_prompt:] == [IGNORE_INDEX] * (len(on.input_ids) - n_prompt)  # not the target's
    prompt_ids, prompt_labels = on.input_ids[:n_prompt], on.prompt_labels[:n_prompt]
    assert prompt_labels[0] == IGNORE_INDEX  # nothing before the first token predicts it
    for i in range(1, n_prompt):
        assert prompt_labels[i] == (IGNORE_INDEX if prompt_ids[i] == image_id else prompt_ids[i]), i
    assert "2693" in tokenizer.decode([t for t in prompt_labels if t != IGNORE_INDEX]).replace(" ", "")  # the EHR
    assert sum(l != IGNORE_INDEX for l in prompt_labels) == n_prompt - 1 - 16  # all text but the first token


def test_numbers_are_single_digits(tokenizer):
    ids = tokenizer("2693.0", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["2", "6", "9", "3", ".", "0"]


def test_chat_template_is_used_when_present(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = encode_prompt(tok, "Image:<image>\nAnswer Impression & CheXpert.", image_id, 4)
    text = tok.decode([i for i in ids if i != image_id])
    assert text.startswith("<s>[INST] Image:") and text.endswith("[/INST]") and ids.count(image_id) == 4


def test_pad_batch_left_and_right(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    a = build_sample(
        tokenizer,
        "Image:<image>\nAnswer Impression & CheXpert.",
        "Impression: x",
        image_token_id=image_id,
        num_image_tokens=2,
        max_len=99,
    )
    b = build_sample(tokenizer, prompt_b(EHR), TARGET, image_token_id=image_id, num_image_tokens=2, max_len=999)
    right, left = pad_batch([a, b], 3, "right"), pad_batch([a, b], 3, "left")
    n = len(b.input_ids) - len(a.input_ids)
    assert right["input_ids"][0][-n:] == [3] * n and right["labels"][0][-n:] == [IGNORE_INDEX] * n
    assert left["input_ids"][0][:n] == [3] * n and left["attention_mask"][0][:n] == [0] * n
    assert "prompt_labels" not in right
    a.prompt_labels, b.prompt_labels = list(a.input_ids), list(b.input_ids)  # samples with prompt labels: padded too
    right = pad_batch([a, b], 3, "right")
    assert right["prompt_labels"][0] == a.input_ids + [IGNORE_INDEX] * n and right["prompt_labels"][1] == b.input_ids


def test_between_measurements_cuts_at_numbers_but_not_at_names_or_reference_ranges():
    from training.tokenizer import between_measurements

    text = (
        'A:\n{"spo2": {"value": 93.2, "r": [0.5, 2.0]}, "BNP": {"value": 120, "O2_device": null}}\n\nImage:<image>\nQ'
    )
    assert between_measurements(text) == [
        'A:\n{"spo2": {"value": ',  # spo2 is a name, not a number
        ', "r": [0.5, 2.0]}, "BNP": {"value": ',  # the reference range is part of the constant text
        ', "O2_device": null}}\n\nImage:',  # the tail stops at the image placeholder
    ]
    assert between_measurements("No numbers here.\nImage:<image>") == []


def test_patient_data_measurements_are_digits_after_one_naming_token(synth_dir_module, tokenizer):
    rows = [json.loads(l) for l in (synth_dir_module / "curriculum_train.jsonl").read_text().splitlines()]
    prompt = next(r["prompt"] for r in rows if r["stage"] == "B")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    pieces = [tokenizer.convert_tokens_to_string([t]) for t in tokens]
    assert "".join(pieces) == prompt
    bnp = json.loads(prompt.split("Patient Data:\n")[1].split("\n\nImage:")[0])["Labs"]["BNP"]["value"]
    at = next(i for i, p in enumerate(pieces) if p.endswith('"BNP": {\n      "value": '))
    assert "".join(pieces[at + 1 : at + 1 + len(str(bnp))]) == str(bnp)  # read digit by digit...
    assert all(len(p) == 1 for p in pieces[at + 1 : at + 1 + len(str(bnp))])
    assert '"reference_range"' in pieces[at + 1 + len(str(bnp))]  # ...then one token up to the next measurement
    assert len(tokens) < 70  # the whole Patient Data block is ~40 tokens, the plain JSON text ~600 characters

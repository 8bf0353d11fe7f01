"""The tiny base's vision-tower pre-training (training/vision_pretrain.py): what it learns from, and that it learns.
Bit-identical weights on both runtimes: tests/test_ray_train.py; what it buys on held-out styles: README
"Learning on other generators" and tests/test_learning_styles.py."""

from __future__ import annotations

import json

import numpy as np

from datasets_io.records import CHEXPERT_LABELS


def test_labels_are_the_positive_chexpert_entries_of_each_target():
    from training.vision_pretrain import label_matrix

    chexpert = {label: "Negative" for label in CHEXPERT_LABELS}
    chexpert |= {"Cardiomegaly": "Positive", "Edema": "Uncertain", "Pneumothorax": "Positive"}
    target = "Impression: x.\n\nCheXpert:\n" + json.dumps(chexpert, indent=2)
    m = label_matrix([target, "Impression: no block at all"])
    assert m.shape == (2, len(CHEXPERT_LABELS)) and m.dtype == np.float32
    positive = [CHEXPERT_LABELS[i] for i in np.flatnonzero(m[0])]
    assert positive == ["Cardiomegaly", "Pneumothorax"]  # Uncertain is not Positive
    assert not m[1].any()  # a target without a CheXpert block teaches "nothing there", never crashes
    u = label_matrix([target], uncertain=1.0)[0]  # U-Ones: an Uncertain finding counts as drawn
    assert [CHEXPERT_LABELS[i] for i in np.flatnonzero(u)] == ["Cardiomegaly", "Edema", "Pneumothorax"]
    assert label_matrix([target], uncertain=0.5)[0][CHEXPERT_LABELS.index("Edema")] == 0.5


def test_rare_labels_are_weighted_by_their_negatives_per_positive():
    import torch

    from training.vision_pretrain import positive_weights

    labels = torch.zeros(40, len(CHEXPERT_LABELS))
    labels[:1, 0] = 1  # 1 positive in 40
    labels[:10, 1] = 1  # 10 in 40
    labels[:, 2] = 1  # always positive: no negative to balance against
    w = positive_weights(labels)
    assert w.shape == (len(CHEXPERT_LABELS),)
    assert w[0].item() == 39.0 and w[1].item() == 3.0  # a 1-in-40 finding pulls like a common one
    assert w[2].item() == 1.0 and (w[3:] == 1.0).all()  # always / never positive: weight 1, never 0 or a division by 0


def test_pretraining_lowers_the_label_loss_and_changes_the_tower(synth_dir):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from datasets_io.images import ImageSpec
    from training.vision_pretrain import pretrain_vision_tower

    lines = (synth_dir / "curriculum_train.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if r["stage"] == "A"]
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=128, patch_size=32
    )
    tower = CLIPVisionModel(config)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    _, done = pretrain_vision_tower(
        tower,
        [r["image"] for r in rows],
        [r["target"] for r in rows],
        data_root=str(synth_dir),
        spec=ImageSpec(128),
        steps=60,
        lr=3e-3,
        batch_size=8,
        seed=0,
    )
    print(f"[measured] pre-training loss {done['first_loss']} -> {done['final_loss']} in {done['seconds']:.1f}s")
    assert done["images"] == len(rows) and done["steps"] == 60
    assert done["final_loss"] < 0.6 * done["first_loss"]
    assert any(not np.array_equal(before[k].numpy(), v.numpy()) for k, v in tower.state_dict().items())


def test_the_base_origin_records_the_pretraining_and_refuses_another(tiny_cfg, tmp_path):
    import pytest

    from datasets_io.errors import LauncherError
    from training.model import ORIGIN_FILE, check_tiny_base_origin, tiny_base_origin

    texts = ["a corpus", "of two texts"]
    plain, pretrained = tiny_cfg(), tiny_cfg(**{"model.tiny.vision_pretrain_steps": 5})
    # without pre-training the origin is what bases built before it recorded (they still match)
    assert "vision_pretrain_steps" not in tiny_base_origin(plain, texts)["model.tiny"]
    assert "vision_pretrain" not in tiny_base_origin(plain, texts)
    with_it = tiny_base_origin(pretrained, texts)
    assert with_it["model.tiny"]["vision_pretrain_steps"] == 5 and with_it["vision_pretrain"]["train.lr"] == 2.5e-3
    base = tmp_path / "base"
    base.mkdir()
    (base / ORIGIN_FILE).write_text(json.dumps(tiny_base_origin(plain, texts)))
    check_tiny_base_origin(plain, texts, base)
    with pytest.raises(
        LauncherError, match="does not belong to this run's data and settings: it was built from model.tiny"
    ):
        check_tiny_base_origin(pretrained, texts, base)  # a random tower is not silently reused as a pre-trained one
    # the U-Zeros targets (the default) leave the origin as bases built before the setting existed; U-Ones is another
    assert "vision_pretrain_uncertain" not in with_it["model.tiny"]
    (base / ORIGIN_FILE).write_text(json.dumps(with_it))
    u_ones = tiny_cfg(**{"model.tiny.vision_pretrain_steps": 5, "model.tiny.vision_pretrain_uncertain": 1.0})
    assert tiny_base_origin(u_ones, texts)["model.tiny"]["vision_pretrain_uncertain"] == 1.0
    with pytest.raises(LauncherError, match="model.tiny"):
        check_tiny_base_origin(u_ones, texts, base)

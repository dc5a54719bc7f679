"""Tests for the tiny offline backbones in mmpeft.testing."""

import pytest
import torch
import transformers as tf
from PIL import Image

from mmpeft.testing import build_tiny_backbone

MODEL_CLASSES = {"clip": tf.CLIPModel, "siglip": tf.SiglipModel, "blip": tf.BlipForImageTextRetrieval}
TEXT = "a happy dog on a red day"


@pytest.fixture(scope="module", params=sorted(MODEL_CLASSES))
def built(request, tmp_path_factory):
    """Build one tiny checkpoint per family and load it back from the folder alone."""
    family = request.param
    out = build_tiny_backbone(family, tmp_path_factory.mktemp(family), seed=0)
    model, info = MODEL_CLASSES[family].from_pretrained(out, output_loading_info=True)
    return family, out, model.eval(), info


def test_loads_without_missing_or_new_weights(built):
    family, out, model, info = built
    assert tf.AutoConfig.from_pretrained(out).model_type == family
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]


def test_tokenizer_matches_vocab_and_round_trips(built):
    family, out, model, _ = built
    tok = tf.AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.text_config.vocab_size
    ids = tok(TEXT).input_ids
    assert max(ids) < len(tok)
    assert " ".join(tok.decode(ids, skip_special_tokens=True).lower().split()) == TEXT
    if family == "clip":
        assert ids[0] == tok.bos_token_id == model.config.text_config.bos_token_id
        assert ids[-1] == tok.eos_token_id == model.config.text_config.eos_token_id
        assert tok.convert_ids_to_tokens(ids[-1]) == "<|endoftext|>"
    if family == "siglip":
        assert tok.model_max_length == model.config.text_config.max_position_embeddings
        assert tok.pad_token_id == tok.eos_token_id
    if family == "blip":
        assert tok.bos_token == "[DEC]" and tok.bos_token_id == model.config.text_config.bos_token_id
        assert tok.pad_token_id == model.config.text_config.pad_token_id
        assert tok.sep_token_id == model.config.text_config.sep_token_id
        assert "[ENC]" in tok.all_special_tokens


def test_image_processor_resizes_to_image_size(built):
    _, out, _, _ = built
    proc = tf.AutoImageProcessor.from_pretrained(out)
    pixels = proc(Image.new("RGB", (50, 40), (200, 30, 30)), return_tensors="pt").pixel_values
    assert tuple(pixels.shape) == (1, 3, 32, 32)


def test_forward_pass(built):
    family, out, model, _ = built
    tok = tf.AutoTokenizer.from_pretrained(out)
    padding = "max_length" if family == "siglip" else True
    text = tok([TEXT, "a cat"], padding=padding, return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if family == "blip":
            scores = model(input_ids=text.input_ids, pixel_values=pixels, use_itm_head=False).itm_score
            assert scores.shape == (2, 2)
        else:
            logits = model(input_ids=text.input_ids, pixel_values=pixels).logits_per_image
            assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", sorted(MODEL_CLASSES))
def test_seed_controls_weights(family, tmp_path):
    def weights(seed, name):
        out = build_tiny_backbone(family, tmp_path / name, seed=seed, num_layers=1)
        return MODEL_CLASSES[family].from_pretrained(out).state_dict()

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unknown_family_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="clip, siglip, blip"):
        build_tiny_backbone("llava", tmp_path)

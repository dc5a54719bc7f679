"""Backbone registry and loader: family lookup, loading checks, fingerprints and the text padding policy."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import load_file, save_file

from mmpeft.backbones import (
    BackboneError,
    get_family,
    list_backbones,
    load_backbone,
    register_backbone,
    weights_fingerprint,
)
from mmpeft.data import Collator, encode_texts

FAMILIES = ("clip", "siglip", "blip")
SHORT = ["a dog", "a red cat"]
LONG = "a photo of a big brown dog running on the beach near the sea under a blue sky on a warm day with many birds"


@pytest.fixture(scope="module")
def backbones(tiny_paths):
    """family -> a loaded tiny backbone; only read here, never wrapped with adapters."""
    return {f: load_backbone(str(tiny_paths[f])) for f in FAMILIES}


def _batch(backbone, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Tokens and pixels built exactly as mmpeft's data layer builds a training batch."""
    max_length = max_length or backbone.max_text_length
    encoded = encode_texts(backbone.tokenizer, texts, max_length=max_length)
    images = [Image.new("RGB", (40, 40), (30 * i % 256, 200, 90)) for i in range(len(texts))]
    pixels = backbone.image_processor(images=images, return_tensors="pt")["pixel_values"]
    items = [{"input_ids": ids, "pixel_values": pixels[i], "labels": 0, "index": i}
             for i, ids in enumerate(encoded.input_ids)]
    return Collator(backbone.tokenizer.pad_token_id, backbone.text_padding, max_length)(items)


# --- registry -------------------------------------------------------------------------------------------------


def test_list_backbones_names_families_and_short_name():
    rows = {row["name"]: row for row in list_backbones()}
    assert {"clip", "siglip", "blip", "tiny-clip"} <= set(rows)
    for family in FAMILIES:
        assert rows[family]["kind"] == "family"
        assert family in rows[family]["model_types"]
    assert rows["tiny-clip"]["kind"] == "short name"


def test_get_family_by_name_and_model_type():
    for family in FAMILIES:
        assert get_family(family).name == family
    assert get_family("clip") is get_family("clip")


def test_unknown_family_names_supported_ones():
    with pytest.raises(ValueError) as err:
        get_family("nope")
    message = str(err.value)
    assert "'nope'" in message
    for family in FAMILIES:
        assert family in message


def test_duplicate_registration_raises():
    clip = get_family("clip")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(dataclasses.replace(clip))
    # A new name that claims an already served model_type is rejected too.
    with pytest.raises(ValueError, match="already belong"):
        register_backbone(dataclasses.replace(clip, name="clip-again"))
    assert {row["name"] for row in list_backbones()} >= {"clip"}
    assert "clip-again" not in {row["name"] for row in list_backbones()}


# --- loading --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_load_detects_family_with_tokenizer_and_processor(backbones, tiny_paths, family):
    backbone = backbones[family]
    assert backbone.family is get_family(family)
    assert backbone.name == str(tiny_paths[family])
    assert isinstance(backbone.tokenizer, tf.PreTrainedTokenizerBase)
    assert isinstance(backbone.image_processor, tf.BaseImageProcessor)
    assert len(backbone.tokenizer) >= backbone.model.config.text_config.vocab_size
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert backbone.fingerprint == weights_fingerprint(backbone.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_dims_match_encoder_outputs(backbones, family):
    backbone = backbones[family]
    batch = _batch(backbone, SHORT + [LONG])
    dims = backbone.embed_dims
    with torch.no_grad():
        text = backbone.family.encode_text(backbone.model, batch["input_ids"], batch["attention_mask"])
        image = backbone.family.encode_image(backbone.model, batch["pixel_values"])
    batch_size, width = batch["input_ids"].shape
    assert text.pooled.shape == (batch_size, dims["text"])
    assert text.tokens.shape == (batch_size, width, dims["text_tokens"])
    assert text.mask.shape == (batch_size, width)
    assert image.pooled.shape == (batch_size, dims["vision"])
    assert image.tokens.shape[0] == batch_size and image.tokens.shape[-1] == dims["vision_tokens"]
    assert image.mask is None


def test_missing_text_tower_weights_raise(tiny_paths, tmp_path):
    folder = tmp_path / "clip-missing"
    shutil.copytree(tiny_paths["clip"], folder)
    state = load_file(folder / "model.safetensors")
    dropped = sorted(k for k in state if k.startswith("text_model.encoder.layers.1.self_attn."))
    assert dropped
    save_file({k: v for k, v in state.items() if k not in dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(BackboneError) as err:
        load_backbone(str(folder))
    message = str(err.value)
    assert f"{len(dropped)} tower weight(s) missing" in message
    for key in dropped:
        assert key in message


def test_tokenizer_smaller_than_vocab_raises(tiny_paths, tmp_path):
    folder = tmp_path / "clip-big-vocab"
    shutil.copytree(tiny_paths["clip"], folder)
    config = tf.CLIPConfig.from_pretrained(folder)
    tokens = len(tf.AutoTokenizer.from_pretrained(folder))
    config.text_config.vocab_size = tokens + 100
    tf.CLIPModel(config).save_pretrained(folder)  # the old tokenizer files stay
    assert json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"] == tokens + 100
    with pytest.raises(BackboneError, match=rf"has {tokens} tokens but the text tower expects {tokens + 100}"):
        load_backbone(str(folder))


def test_unknown_directory_raises_backbone_error(tmp_path):
    with pytest.raises(BackboneError, match="Cannot load a model config"):
        load_backbone(str(tmp_path / "does-not-exist"))


# --- fingerprints ---------------------------------------------------------------------------------------------


def test_fingerprint_identifies_weights(tiny_paths, tiny_clip_other_seed):
    first = load_backbone(str(tiny_paths["clip"]))
    again = load_backbone(str(tiny_paths["clip"]))
    half = load_backbone(str(tiny_paths["clip"]), dtype="bfloat16")
    other = load_backbone(str(tiny_clip_other_seed))
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert first.fingerprint == again.fingerprint == half.fingerprint
    assert weights_fingerprint(first.model) == first.fingerprint
    assert other.fingerprint != first.fingerprint
    # Other families differ too, and a single changed weight value changes the hash.
    assert len({load_backbone(str(tiny_paths[f])).fingerprint for f in FAMILIES}) == 3
    with torch.no_grad():
        first.model.text_projection.weight[0, 0] += 1.0
    assert weights_fingerprint(first.model) != again.fingerprint


# --- padding policy -------------------------------------------------------------------------------------------


def test_padding_policies():
    assert get_family("siglip").text_padding == "max_length"
    assert get_family("clip").text_padding == "longest"
    assert get_family("blip").text_padding == "longest"


@pytest.mark.parametrize("family", FAMILIES)
def test_text_embedding_independent_of_batch_mates(backbones, family):
    """A caption's embedding must not depend on how long the other captions of its batch are."""
    backbone = backbones[family]
    short = _batch(backbone, SHORT)
    mixed = _batch(backbone, SHORT + [LONG])
    if family != "siglip":
        assert mixed["input_ids"].shape[1] > short["input_ids"].shape[1]  # the padding really differs
    with torch.no_grad():
        alone = backbone.family.encode_text(backbone.model, short["input_ids"], short["attention_mask"]).pooled
        together = backbone.family.encode_text(backbone.model, mixed["input_ids"], mixed["attention_mask"]).pooled
    assert alone.dtype == torch.float32
    torch.testing.assert_close(together[: len(SHORT)], alone)


def test_siglip_needs_max_length_padding(backbones):
    """The check above has teeth: SigLIP pools the last position, so 'longest' padding would change embeddings."""
    backbone = backbones["siglip"]
    max_length = backbone.max_text_length
    encoded = encode_texts(backbone.tokenizer, SHORT + [LONG], max_length=max_length)
    items = [{"input_ids": ids, "pixel_values": torch.zeros(3, 2, 2), "labels": 0, "index": i}
             for i, ids in enumerate(encoded.input_ids)]
    longest = Collator(backbone.tokenizer.pad_token_id, "longest", max_length)
    short, mixed = longest(items[:2]), longest(items)
    with torch.no_grad():
        alone = backbone.family.encode_text(backbone.model, short["input_ids"], short["attention_mask"]).pooled
        together = backbone.family.encode_text(backbone.model, mixed["input_ids"], mixed["attention_mask"]).pooled
    assert not torch.allclose(together[:2], alone, atol=1e-4)


def test_building_tiny_clip_random_leaves_the_callers_seed_alone(tmp_path, monkeypatch):
    """First use of `tiny-clip-random` builds it into the cache: that must not reseed the caller's RNG (it did:
    the first run of a seed differed from later ones, and seeds 0 and 1 gave the same head), and the weights stay
    those of seed 0 (the cache key is the config's digest)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from mmpeft.backbones.embedded import PRETRAINED_DIR, RANDOM_BACKBONE
    from mmpeft.backbones.registry import resolve_short_name

    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path))
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    built = resolve_short_name(RANDOM_BACKBONE)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(0)
    reference = CLIPModel(CLIPConfig.from_pretrained(PRETRAINED_DIR)).state_dict()
    loaded = CLIPModel.from_pretrained(built).state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)

"""The procedural world, its tasks and tokenizer, the pretraining recipe and the shipped tiny CLIP."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

from mmpeft.backbones import load_backbone
from mmpeft.backbones.embedded import PRETRAINED_DIR
from mmpeft.cli import main as cli_main
from mmpeft.data import DataError, read_split
from mmpeft.data.augment import TextAugment
from mmpeft.world import scenes, sentiment
from mmpeft.world.fewshot import write_fewshot
from mmpeft.world.position import position_example, write_position
from mmpeft.world.vocab import SYNONYMS, build_world_tokenizer, world_words
from mmpeft.world.zero_shot import evaluation_scenes, zero_shot_accuracy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
from pretrain_clip import to_pixels  # noqa: E402


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_scenes_are_a_pure_function_of_seed_and_index():
    a = [scenes.pretraining_pair(7, i) for i in range(50)]
    assert a == [scenes.pretraining_pair(7, i) for i in range(50)]
    assert [_png(scenes.render(s)) for s, _ in a[:10]] == [_png(scenes.render(s)) for s, _ in a[:10]]
    assert [c for _, c in a] != [c for _, c in (scenes.pretraining_pair(8, i) for i in range(50))]
    assert scenes.render(a[0][0]).size == (64, 64)


def test_pretraining_never_shows_a_held_out_pair_and_captions_name_every_attribute():
    pairs = [scenes.pretraining_pair(0, i) for i in range(3000)]
    assert not any(s.held_out for s, _ in pairs)
    assert len({(s.colour, s.shape) for s, _ in pairs}) == len(scenes.COLOURS) * len(scenes.SHAPES) - len(scenes.HELD_OUT)
    assert len({c for _, c in pairs}) > 2500  # distinct pairs, not a small pool repeated
    for s, c in pairs[:200]:
        plural = scenes.PLURALS[s.shape] if s.count > 1 else s.shape
        assert s.colour in c and f" {plural}" in c and s.position.replace("center", "") in c
        assert (s.expression or "") in c
    # Faces are a third of the stream. Half the captions of sunny, cloudy and rainy scenes give the day's mood
    # as a remark instead of the sky; no other caption carries one.
    faces = [(s, c) for s, c in pairs if s.shape == "face"]
    assert 0.28 < len(faces) / len(pairs) < 0.38
    sky_words = {phrase for phrases in scenes.WEATHER_PHRASES.values() for phrase in phrases}
    with_remark = 0
    for s, c in pairs:
        said = {p for p, phrases in scenes.OPINIONS.items() if any(phrase in c for phrase in phrases)}
        assert said <= {scenes.MOOD_OF_WEATHER.get(s.weather)} - {None}, (s, c)
        assert bool(said) != any(phrase in c for phrase in sky_words), (s, c)  # a remark or the sky, not both
        with_remark += bool(said)
    assert 0.25 < with_remark / len(pairs) < 0.35
    used = {phrase for _, c in pairs for phrases in scenes.OPINIONS.values() for phrase in phrases if phrase in c}
    assert used == {phrase for phrases in scenes.OPINIONS.values() for phrase in phrases}  # pretraining saw them all
    held = evaluation_scenes(0, 100, held_out=True)
    assert all(s.held_out for s in held)


def test_bad_scene_is_refused_with_the_valid_values():
    with pytest.raises(ValueError, match="colour must be one of"):
        scenes.Scene("teal", "circle", 1, "left", "sunny")
    with pytest.raises(ValueError, match="needs an expression"):
        scenes.Scene("red", "face", 1, "left", "sunny")


def test_sentiment_follows_its_rule_and_neither_modality_alone_suffices(tmp_path):
    paths = sentiment.write_sentiment(tmp_path / "a", seed=3, sizes={"train": 600, "val": 30, "test": 30})
    again = sentiment.write_sentiment(tmp_path / "b", seed=3, sizes={"train": 600, "val": 30, "test": 30})
    for split in ("train", "val", "test"):
        assert paths[split].read_bytes() == again[split].read_bytes()
    images = sorted((tmp_path / "a" / "images").iterdir())
    assert len(images) == 660 and images[0].read_bytes() == (tmp_path / "b" / "images" / images[0].name).read_bytes()
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    expression_words = set(scenes.EXPRESSIONS)
    by_image, by_text = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for r in rows:
        assert (r["label"], r["decided_by"]) == sentiment.label_for(r["text_polarity"], r["image_polarity"])
        assert sentiment.POLARITY_OF_EXPRESSION[r["scene"]["expression"]] == r["image_polarity"]
        words = set(r["text"].replace(",", " ").replace(":", " ").replace("!", " ").replace(".", " ").split())
        assert not (expression_words | {"sunny", "sun", "cloudy", "clouds", "rain", "rainy"}) & words, r["text"]
        assert r["scene"]["weather"] == sentiment.WEATHER_OF_POLARITY[r["image_polarity"]]
        by_image[r["image_polarity"]][r["label"]] += 1
        by_text[r["text_polarity"]][r["label"]] += 1
    # Training posts use one half of the opinion phrases, val and test posts the other (pretraining saw both).
    for split in ("train", "val", "test"):
        for r in (json.loads(line) for line in paths[split].read_text().splitlines()):
            phrases = [p for polarity in sentiment.LABELS for p in scenes.OPINIONS[polarity] if r["text"].startswith(p)
                       or r["text"].endswith(p)]
            assert phrases and set(phrases) <= set(sentiment.PHRASES[split][r["text_polarity"]]), (split, r["text"])
    assert not {p for ps in sentiment.PHRASES["train"].values() for p in ps} & {
        p for ps in sentiment.PHRASES["test"].values() for p in ps}
    assert {r["decided_by"] for r in rows} == {"both", "image", "text"}
    assert {r["label"] for r in rows} == set(sentiment.LABELS)
    # The best a model reading one modality can do: predict the majority label of what it sees.
    image_only = sum(max(c.values()) for c in by_image.values()) / len(rows)
    text_only = sum(max(c.values()) for c in by_text.values()) / len(rows)
    assert image_only < 0.76 and text_only < 0.70, (image_only, text_only)
    # Splits come from disjoint streams; another seed gives another set; the same arguments rewrite nothing.
    assert paths["val"].read_text() != paths["test"].read_text()
    other = sentiment.write_sentiment(tmp_path / "c", seed=4, sizes={"train": 600, "val": 30, "test": 30})
    assert other["train"].read_bytes() != paths["train"].read_bytes()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    sentiment.write_sentiment(tmp_path / "a", seed=3, sizes={"train": 600, "val": 30, "test": 30})
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    assert len(read_split(paths["test"]).examples) == 30  # the format mmpeft reads for a user's data


def test_make_sentiment_cli_writes_manifests_and_refuses_a_foreign_folder(tmp_path, capsys):
    assert cli_main(["data", "make-sentiment", str(tmp_path / "s"), "--train", "6", "--val", "3", "--test", "3"]) == 0
    assert "mmpeft train data.train=" in capsys.readouterr().out
    assert len((tmp_path / "s" / "train.jsonl").read_text().splitlines()) == 6
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.jpg").write_bytes(b"x")
    assert cli_main(["data", "make-sentiment", str(tmp_path / "mine")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "mine" / "photo.jpg").read_bytes() == b"x"


def test_fewshot_draws_k_per_class_by_seed_over_fixed_val_and_test(tmp_path):
    a = write_fewshot(tmp_path / "a", shots=2, seed=0, val_per_class=2, test_per_class=3)
    b = write_fewshot(tmp_path / "b", shots=2, seed=1, val_per_class=2, test_per_class=3)
    c = write_fewshot(tmp_path / "c", shots=2, seed=0, val_per_class=2, test_per_class=3)
    rows = [json.loads(line) for line in a["train"].read_text().splitlines()]
    assert collections.Counter(r["label"] for r in rows) == {s: 2 for s in scenes.SHAPES}
    assert a["train"].read_text() == c["train"].read_text() != b["train"].read_text()
    assert a["test"].read_text() == b["test"].read_text() and a["val"].read_text() == b["val"].read_text()
    # No text column: fine for heads that never read captions, refused (naming the column) otherwise.
    assert len(read_split(a["test"], require_text=False).examples) == 18
    with pytest.raises(DataError, match="missing column 'text'"):
        read_split(a["test"])


def test_position_label_is_where_the_objects_are_and_the_caption_never_says(tmp_path):
    sizes = {"train": 4, "val": 2, "test": 3}
    a = write_position(tmp_path / "a", per_class=sizes)
    b = write_position(tmp_path / "b", per_class=sizes, seed=1)
    c = write_position(tmp_path / "c", per_class=sizes)
    for split, n in sizes.items():
        rows = [json.loads(line) for line in a[split].read_text().splitlines()]
        assert collections.Counter(r["label"] for r in rows) == {p: n for p in scenes.POSITIONS}
        assert len({r["label"] for r in rows[:3]}) > 1  # shuffled, not in blocks of one label
        for row in rows:
            assert not {"left", "right", "center", "middle"} & set(row["text"].replace(",", "").split()), row
    assert a["train"].read_text() == c["train"].read_text() != b["train"].read_text()
    for position in scenes.POSITIONS:
        scene, text = position_example(0, "train", position, 0)
        assert scene.position == position and scene.colour in text
        # the objects are drawn in the labelled third of the image: it differs most from an empty sky there
        sky = scenes.render(scenes.Scene(**{**scene.__dict__, "count": 1, "size": 0}))
        diff = torch.from_numpy(np.asarray(scenes.render(scene), dtype=np.float32) - np.asarray(sky, dtype=np.float32))
        per_column = diff.abs().sum(dim=(0, 2))
        thirds = [per_column[i * 21:(i + 1) * 21].sum() for i in range(3)]
        assert max(range(3), key=thirds.__getitem__) == scenes.POSITIONS.index(position)


def test_world_tokenizer_loads_offline_and_keeps_every_world_word_whole(tmp_path):
    tok = build_world_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = tf.AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) < 2000
    from open_clip.tokenizer import SimpleTokenizer

    clip = SimpleTokenizer()
    for word in world_words():  # the same pieces as real CLIP's BPE, and the world's nouns and adjectives whole
        assert loaded.convert_ids_to_tokens(loaded(word, add_special_tokens=False)["input_ids"]) == clip.bpe(
            word).split(), word
    for word in [*scenes.COLOURS, *scenes.SHAPES, *scenes.POSITIONS]:
        assert len(loaded(word, add_special_tokens=False)["input_ids"]) == 1, word
    text = "what a wonderful sight! two red faces at night"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.convert_ids_to_tokens(loaded("zyxwvut")["input_ids"])[1:-1]  # any text still tokenizes


def test_text_augmentation_is_keyed_and_keeps_meaning():
    aug = TextAugment(word_dropout=0.2, synonym_swap=0.5, seed=1)
    text = "i love this: a wonderful sight, two red faces in the middle"
    assert aug(text, epoch=0, index=3) == aug(text, epoch=0, index=3)
    outs = {aug(text, epoch=e, index=3) for e in range(20)}
    assert len(outs) > 10
    groups = {w: set(g) for g in SYNONYMS for w in g}
    for out in outs:
        assert out.split()
        for word in out.replace(",", " ").replace(":", " ").split():
            original = text.replace(",", " ").replace(":", " ").split()
            assert word in original or any(word in groups.get(w, ()) for w in original), (word, out)
    assert TextAugment(word_dropout=0.99)("hello world", epoch=0, index=0).strip()
    with pytest.raises(ValueError, match="word_dropout"):
        TextAugment(word_dropout=1.5)


def test_pretraining_fast_path_equals_the_saved_image_processor():
    processor = tf.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    images = [scenes.render(scenes.pretraining_pair(0, i)[0]) for i in range(4)]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(to_pixels(images), expected, atol=1e-5)


def test_pretraining_recipe_runs_saves_a_clip_folder_with_its_card(tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain_clip.py"), "--out", str(out), "--steps", "3",
           "--batch-size", "8", "--eval-examples", "16", "--num-workers", "0", "--layers", "1",
           "--text-width", "32", "--vision-width", "32", "--embed-dim", "16"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 3/3" in run.stdout and "zero-shot" in run.stdout
    card = (out / "README.md").read_text()
    assert "--steps 3" in card and "seed 0" in card and "| colour+shape |" in card
    results = json.loads((out / "zero_shot.json").read_text())
    assert results["steps"] == 3 and set(results["held_out"]) >= {"colour", "shape", "colour+shape"}
    backbone = load_backbone(str(out))  # the same path a hub id or the shipped checkpoint takes
    assert backbone.family.name == "clip" and isinstance(backbone.model, tf.CLIPModel)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already holds a checkpoint" in again.stderr + again.stdout


def test_shipped_tiny_clip_is_small_loads_offline_and_beats_chance_zero_shot():
    size = sum(p.stat().st_size for p in PRETRAINED_DIR.iterdir())
    assert size <= 20 * 2**20, size
    card = (PRETRAINED_DIR / "README.md").read_text()
    assert "recipes/pretrain_clip.py" in card and "held-out" in card
    backbone = load_backbone("tiny-clip")
    assert Path(backbone.name).resolve() == PRETRAINED_DIR or backbone.name == "tiny-clip"
    model = backbone.model.float()
    results = zero_shot_accuracy(model, backbone.tokenizer, to_pixels, evaluation_scenes(1, 210, held_out=True))
    for attribute in ("colour", "colour+shape", "weather"):  # the card lists every attribute
        r = results[attribute]
        assert r["accuracy"] >= 3 * r["chance"], (attribute, r)
    random = load_backbone("tiny-clip-random")
    assert random.fingerprint != backbone.fingerprint
    shapes = {n: p.shape for n, p in backbone.model.named_parameters()}
    assert shapes == {n: p.shape for n, p in random.model.named_parameters()}  # same architecture, other weights


def _phrase_probe(model: tf.CLIPModel, tokenizer) -> float:
    """Fit a linear probe on frozen text features of training posts; its accuracy on val posts' polarity."""
    def features(split: str, n: int):
        examples = [sentiment.sentiment_example(0, split, i) for i in range(n)]
        batch = tokenizer([e.text for e in examples], padding=True, return_tensors="pt")
        with torch.no_grad():
            x = torch.nn.functional.normalize(model.text_model(**batch).pooler_output.float(), dim=-1) * 10
        return x, torch.tensor([sentiment.LABELS.index(e.text_polarity) for e in examples])

    (x, y), (x_val, y_val) = features("train", 300), features("val", 150)
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], len(sentiment.LABELS))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        optimizer.step()
    assert (probe(x).argmax(-1) == y).float().mean() > 0.9  # the training phrases are separable either way
    return (probe(x_val).argmax(-1) == y_val).float().mean().item()


def test_shipped_text_tower_knows_the_opinion_phrases_fine_tuning_never_shows():
    """Val/test posts use opinion phrases training posts never do: only pretraining can have taught them."""
    pretrained, random_init = load_backbone("tiny-clip"), load_backbone("tiny-clip-random")
    assert _phrase_probe(pretrained.model.float().eval(), pretrained.tokenizer) >= 0.9
    assert _phrase_probe(random_init.model.float().eval(), random_init.tokenizer) < 0.6


def test_text_augmentation_reaches_training_batches_only(tmp_path, tiny_paths):
    from mmpeft.config import DataConfig
    from mmpeft.data.loaders import make_loader

    paths = sentiment.write_sentiment(tmp_path / "s", sizes={"train": 8, "val": 3, "test": 3})
    backbone = load_backbone(str(tiny_paths["clip"]))
    cfg = DataConfig(num_workers=0, batch_size=8)
    cfg.augment.word_dropout, cfg.augment.synonym_swap = 0.3, 0.5
    split = read_split(paths["train"])
    train, _ = make_loader(split, list(sentiment.LABELS), backbone, cfg, train=True, seed=0)
    plain, _ = make_loader(split, list(sentiment.LABELS), backbone, cfg, train=False, seed=0)

    def ids(loader, epoch):
        loader.dataset.set_epoch(epoch)
        return [loader.dataset[i]["input_ids"] for i in range(8)]

    assert ids(train, 0) == ids(train, 0) != ids(train, 1)
    assert ids(plain, 0) == ids(plain, 1) == [backbone.tokenizer(ex.text)["input_ids"] for ex in split.examples]

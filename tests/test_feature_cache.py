"""The frozen-tower feature cache (mmpeft/models/feature_cache.py): cached results equal uncached ones, in memory
and memory-mapped in a fresh cache object, with images no longer decoded; the key sees every weight; the cache
says why it is off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpeft import build_classifier, build_dataloaders, load_backbone, load_config
from mmpeft.models.feature_cache import FeatureCache, cache_blockers, cache_key, tower_modules, tower_weights_sha256


def _setup(tiny_paths, manifest, *overrides):
    cfg = load_config(None, [f"model.name={tiny_paths['clip']}", f"data.train={manifest}", "data.batch_size=4",
                             "data.num_workers=0", "model.vision.mode=frozen", "model.text.lora.dropout=0.0",
                             "head.dropout=0.0", *overrides])
    backbone = load_backbone(cfg.model.name)
    data = build_dataloaders(cfg.data, backbone, splits=("train",))
    torch.manual_seed(0)
    model = build_classifier(backbone, cfg, data.label_names).eval()
    return cfg, backbone, data.loaders["train"], model


def _key(model, loader, backbone, **kw):
    return cache_key(model, "vision", loader.dataset, mixed_precision="no", device="cpu",
                     image_processor=backbone.image_processor, **kw)


def _logits(model, loader):
    with torch.no_grad():
        return torch.cat([model(**batch) for batch in loader])


def test_cached_vision_features_give_the_uncached_logits(tiny_paths, sixteen_examples, tmp_path):
    cfg, backbone, loader, model = _setup(tiny_paths, sixteen_examples)
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=4, shuffle=False, collate_fn=loader.collate_fn)
    assert cache_blockers(model.train(), "vision") == []
    model.eval()
    uncached = _logits(model, loader)
    key = _key(model, loader, backbone)
    cache = FeatureCache(key, len(loader.dataset), root=tmp_path / "features")
    model.feature_caches = {"vision": cache}
    first = _logits(model, loader)  # fills the cache
    assert cache.complete and (tmp_path / "features" / key / "complete.json").is_file()
    loader.dataset.load_images = False  # later epochs: no image is decoded at all
    batch = next(iter(loader))
    assert "pixel_values" not in batch
    second = _logits(model, loader)
    torch.testing.assert_close(first, uncached, rtol=0, atol=0)
    torch.testing.assert_close(second, uncached, rtol=0, atol=0)
    # A fresh process finds the cache on disk, memory-mapped, and computes nothing.
    model.feature_caches = {"vision": FeatureCache(key, len(loader.dataset), root=tmp_path / "features")}
    assert model.feature_caches["vision"].complete
    torch.testing.assert_close(_logits(model, loader), uncached, rtol=0, atol=0)


def test_cache_key_sees_every_weight_dtype_and_input(tiny_paths, sixteen_examples):
    cfg, backbone, loader, model = _setup(tiny_paths, sixteen_examples)
    key = _key(model, loader, backbone)
    weights = tower_weights_sha256(tower_modules(model, "vision"))
    assert len(weights) == 64 and len(key) == 64
    assert _key(model, loader, backbone) == key  # deterministic
    assert cache_key(model, "vision", loader.dataset, mixed_precision="bf16", device="cpu",
                     image_processor=backbone.image_processor) != key
    layer = model.base.vision_model.encoder.layers[0].mlp.fc1
    with torch.no_grad():
        layer.weight[3, 5] += 1e-3  # one value: a sampled fingerprint may miss it, the full hash does not
    assert tower_weights_sha256(tower_modules(model, "vision")) != weights
    with torch.no_grad():
        layer.weight[3, 5] -= 1e-3
    model.base.vision_model.to(torch.bfloat16)
    assert _key(model, loader, backbone) != key
    model.base.vision_model.to(torch.float32)
    from mmpeft.models.precision import restore_attention, set_attention

    sdpa = _key(model, loader, backbone)  # the bf16 round trip above changed weights' last bits: another key
    switched = set_attention(model.base, "eager")
    assert switched and _key(model, loader, backbone) != sdpa  # eager and SDPA differ in the last bits
    restore_attention(switched)
    assert _key(model, loader, backbone) == sdpa
    image = loader.dataset.examples[0].image
    with open(image, "ab") as f:
        f.write(b"\0")
    assert _key(model, loader, backbone) != key


def test_cache_says_why_it_is_off(tiny_paths, sixteen_examples):
    _, _, _, model = _setup(tiny_paths, sixteen_examples)
    model.train()
    assert any("trains (mode lora)" in r for r in cache_blockers(model, "text"))
    assert any("LoRA layers" in r for r in cache_blockers(model, "text"))
    assert any("augmentation" in r for r in cache_blockers(model, "vision", augment=True))
    assert any("token states" in r for r in cache_blockers(model, "vision", head_reads_tokens=True))
    assert any("several processes" in r for r in cache_blockers(model, "vision", num_processes=2))
    dropout = torch.nn.Dropout(0.1)
    model.base.vision_model.add_module("extra_dropout", dropout)  # a frozen tower held in train mode
    dropout.train()
    assert any("dropout" in r for r in cache_blockers(model, "vision"))


# --- the cache in the training loop (mmpeft/training/caching.py) ----------------------------------------------------

def _run(tiny_paths, data, out, *extra):
    from mmpeft import train

    return train(load_config(None, [f"model.name={tiny_paths['clip']}", f"train.output_dir={out}", f"data.train={data}",
                                    f"data.eval={data}", "train.progress=false", "train.tracker=null",
                                    "train.mixed_precision=no", "data.num_workers=0", "data.batch_size=4",
                                    "head.hidden=8", "model.vision.mode=frozen", "train.epochs=3", *extra]))


def test_a_run_with_the_cache_trains_as_one_without_it(tiny_paths, sixteen_examples, tmp_path, monkeypatch):
    """Frozen vision tower, LoRA text tower: every epoch after the first reads the vision features from the cache
    (in memory, or from disk in a later run) and decodes no image; the loss history and the final metrics are the
    uncached run's."""
    from mmpeft.data.dataset import MultimodalDataset

    decoded = []
    load_image = MultimodalDataset.load_image
    monkeypatch.setattr(MultimodalDataset, "load_image", lambda self, i: decoded.append(i) or load_image(self, i))
    off = _run(tiny_paths, sixteen_examples, tmp_path / "off", "train.feature_cache=off")
    decoded_off, decoded[:] = len(decoded), []
    memory = _run(tiny_paths, sixteen_examples, tmp_path / "memory")  # the default
    # 3 epochs of 16 and 4 evaluations of 16 without the cache; with it, the first pass over each split only
    assert (decoded_off, len(decoded)) == (3 * 16 + 4 * 16, 16 + 16)
    disk = [_run(tiny_paths, sixteen_examples, tmp_path / f"disk{i}", "train.feature_cache=disk",
                 f"train.feature_cache_dir={tmp_path / 'cache'}") for i in range(2)]
    assert off["feature_cache"]["vision"] == "not cached (train.feature_cache=off)"
    assert memory["feature_cache"]["vision"] == "cached in memory (train, eval)"
    assert memory["feature_cache"]["text"].startswith("not cached: the text tower trains (mode lora)")
    assert disk[0]["feature_cache"]["vision"].startswith("cached on disk under")
    written = sorted((tmp_path / "cache" / "features").iterdir())
    # train and eval are the same manifest here: the same inputs, one key, one cache for both
    assert len(written) == 1 and (written[0] / "complete.json").is_file()
    for run in (memory, *disk):
        assert [h["loss"] for h in run["history"]] == pytest.approx([h["loss"] for h in off["history"]], abs=1e-5)
        assert run["eval"]["macro_f1"] == off["eval"]["macro_f1"]
        assert run["eval"]["loss"] == pytest.approx(off["eval"]["loss"], abs=1e-5)


def test_the_cache_stays_off_where_the_tower_can_change_and_says_why(tiny_paths, sixteen_examples, tmp_path):
    augmented = _run(tiny_paths, sixteen_examples, tmp_path / "aug", "data.augment.enabled=true", "train.max_steps=1")
    assert augmented["feature_cache"]["vision"] == ("cached in memory (eval); not for train: image augmentation "
                                                    "changes the vision inputs every epoch")
    tokens = _run(tiny_paths, sixteen_examples, tmp_path / "xattn", "head.type=cross_attention", "train.max_steps=1")
    assert tokens["feature_cache"]["vision"] == ("not cached: the head reads token states, and only pooled outputs "
                                                 "are cached")


# --- LoRA on the last N layers: the states below the first adapted layer (mmpeft/models/state_cache.py) -------------

def _count_lower_layer_calls(monkeypatch) -> list[str]:
    """Every forward of a CLIP encoder layer without LoRA, by tower: the layers a state cache skips."""
    from peft.tuners.lora import LoraLayer
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPTextConfig

    calls = []
    forward = CLIPEncoderLayer.forward

    def counted(self, *args, **kwargs):
        if not isinstance(self.self_attn.q_proj, LoraLayer):
            calls.append("text" if isinstance(self.self_attn.config, CLIPTextConfig) else "vision")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CLIPEncoderLayer, "forward", counted)
    return calls


def _same_training(run, off):
    assert [h["loss"] for h in run["history"]] == pytest.approx([h["loss"] for h in off["history"]], abs=1e-5)
    assert run["eval"]["macro_f1"] == off["eval"]["macro_f1"]
    assert run["eval"]["loss"] == pytest.approx(off["eval"]["loss"], abs=1e-5)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_lora_on_the_last_layer_trains_from_cached_states_as_without_them(tiny_paths, sixteen_examples, tmp_path,
                                                                          monkeypatch, tower):
    """LoRA on the last of the tiny CLIP's 2 layers, the other tower frozen: the layer below runs on the first pass
    over each split only (3 epochs of 4 batches and 4 evaluations of 4 batches without the cache), the loss
    history and the metrics are the uncached run's, and a later process reads the states from disk."""
    other = "text" if tower == "vision" else "vision"
    lora = (f"model.{tower}.mode=lora", f"model.{tower}.lora.layers=1", f"model.{other}.mode=frozen")
    calls = _count_lower_layer_calls(monkeypatch)
    off = _run(tiny_paths, sixteen_examples, tmp_path / "off", *lora, "train.feature_cache=off")
    calls_off, calls[:] = calls.count(tower), []
    memory = _run(tiny_paths, sixteen_examples, tmp_path / "memory", *lora)
    assert (calls_off, calls.count(tower)) == (3 * 4 + 4 * 4, 4 + 4)
    assert memory["feature_cache"][tower] == ("cached in memory (train, eval): the hidden states entering layer 1, "
                                              "the first with LoRA")
    _same_training(memory, off)
    disk = []
    for i in range(2):
        calls[:] = []
        disk.append(_run(tiny_paths, sixteen_examples, tmp_path / f"disk{i}", *lora, "train.feature_cache=disk",
                         f"train.feature_cache_dir={tmp_path / 'cache'}"))
        assert calls.count(tower) == (4 + 4 if i == 0 else 0)  # the second run maps what the first wrote
        _same_training(disk[i], off)
    written = [p for p in (tmp_path / "cache" / "features").iterdir() if (p / "states.bin").is_file()]
    assert len(written) == 1 and (written[0] / "complete.json").is_file()
    assert disk[0]["feature_cache"][tower].startswith("cached on disk under")


def test_cached_text_states_fit_batches_of_other_lengths(tiny_paths, sixteen_examples):
    """Rows cached from one batching are padded to another batch's length: the logits are the uncached ones."""
    from mmpeft.models.partial_towers import PARTIAL_FAMILIES
    from mmpeft.models.state_cache import StateCache

    cfg, backbone, loader, model = _setup(tiny_paths, sixteen_examples, "model.text.mode=lora",
                                          "model.text.lora.layers=1")
    dataset, collate = loader.dataset, loader.collate_fn
    by = {size: torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=collate)
          for size in (3, 5)}
    uncached = _logits(model, by[5])
    cache = StateCache("k", len(dataset), PARTIAL_FAMILIES["clip"]["text"], below_layer=1)
    model.feature_caches = {"text": cache}
    torch.testing.assert_close(_logits(model, by[3]), uncached, rtol=0, atol=1e-6)  # fills at the 3-batch lengths
    assert cache.complete and {row.shape[0] for row in cache.rows} != {cache.rows[0].shape[0]}
    torch.testing.assert_close(_logits(model, by[5]), uncached, rtol=0, atol=1e-6)


def _with_config(folder, tmp_path, tower: str, **settings):
    """A copy of a tiny checkpoint with `settings` in one tower's config."""
    import json
    import shutil

    copy = shutil.copytree(folder, tmp_path / f"{folder.name}-changed")
    config = json.loads((copy / "config.json").read_text())
    config[f"{tower}_config"].update(settings)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_the_state_cache_stays_off_where_the_layers_below_can_change_and_says_why(tiny_paths, sixteen_examples,
                                                                                  tmp_path):
    lora = ("model.vision.mode=lora", "model.vision.lora.layers=1", "model.text.mode=frozen", "train.max_steps=1")
    dropout = _with_config(tiny_paths["clip"], tmp_path, "vision", attention_dropout=0.1)
    run = _run({"clip": dropout}, sixteen_examples, tmp_path / "dropout", *lora)
    assert run["feature_cache"]["vision"] == (
        "cached in memory (eval): the hidden states entering layer 1, the first with LoRA; not for train: dropout "
        "vision_model.encoder.layers.0.self_attn (p=0.1) of the vision tower is in train mode")
    augmented = _run(tiny_paths, sixteen_examples, tmp_path / "aug", *lora, "data.augment.enabled=true")
    assert augmented["feature_cache"]["vision"].endswith("not for train: image augmentation changes the vision "
                                                         "inputs every epoch")
    targets = r"model.vision.lora.targets=vision_model\.{}"
    top = _run(tiny_paths, sixteen_examples, tmp_path / "top", *lora[::2], "train.max_steps=1",
               targets.format(r"encoder\.layers\.1\.mlp\.fc1"))  # no `{layer}`: the layer is in the regex
    assert top["feature_cache"]["vision"].startswith("cached in memory (train, eval): the hidden states entering "
                                                     "layer 1")
    embeddings = _run(tiny_paths, sixteen_examples, tmp_path / "embeddings", *lora[::2], "train.max_steps=1",
                      targets.format(r"(embeddings\.patch_embedding|encoder\.layers\.1\.mlp\.fc1)"))
    assert embeddings["feature_cache"]["vision"] == ("not cached: LoRA on vision_model.embeddings.patch_embedding, "
                                                     "below the encoder layers")
    siglip = _run({"clip": tiny_paths["siglip"]}, sixteen_examples, tmp_path / "siglip", *lora)
    assert siglip["feature_cache"]["vision"] == ("not cached: the states below the first adapted layer are cached "
                                                 "only for clip's text and vision and dual's text towers, not "
                                                 "siglip's vision tower")


def test_the_state_cache_key_sees_the_layers_below_and_not_the_adapted_ones(tiny_paths, sixteen_examples):
    cfg, backbone, loader, model = _setup(tiny_paths, sixteen_examples, "model.vision.mode=lora",
                                          "model.vision.lora.layers=1", "model.text.mode=frozen")
    key = _key(model, loader, backbone, below_layer=1)
    assert key != _key(model, loader, backbone) and key != _key(model, loader, backbone, below_layer=0)
    layers = model.base.vision_model.encoder.layers
    with torch.no_grad():
        layers[1].mlp.fc1.weight[0, 0] += 1.0  # above the split: what LoRA on it trains from does not change
        for name, param in layers[1].named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    assert _key(model, loader, backbone, below_layer=1) == key
    with torch.no_grad():
        layers[0].mlp.fc1.weight[3, 5] += 1e-3
    assert _key(model, loader, backbone, below_layer=1) != key


def _count_bert_layer_calls(monkeypatch) -> list[int]:
    """One entry per forward of a BERT layer without LoRA: the layers a state cache skips."""
    from peft.tuners.lora import LoraLayer
    from transformers.models.bert.modeling_bert import BertLayer

    calls = []
    forward = BertLayer.forward

    def counted(self, *args, **kwargs):
        if not isinstance(self.attention.self.query, LoraLayer):
            calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BertLayer, "forward", counted)
    return calls


def test_a_dual_bert_text_tower_caches_the_states_below_its_last_layer(tiny_dual, sixteen_examples, tmp_path,
                                                                       monkeypatch):
    """A dual encoder's BERT text tower with LoRA on its last layer: with BERT's hidden dropout 0.1 in train mode
    the training split is not cached (said), evaluation is; with dropout 0 both are, and the run trains as the
    uncached one."""
    import json
    import shutil

    name = tiny_dual["torchvision"]
    bert = name.split(",")[0].removeprefix("dual:text=")
    quiet = shutil.copytree(bert, tmp_path / "bert-no-dropout")
    config = json.loads((quiet / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (quiet / "config.json").write_text(json.dumps(config))
    lora = ("model.text.mode=lora", "model.text.lora.layers=1", "model.vision.mode=frozen", "head.hidden=0")
    calls = _count_bert_layer_calls(monkeypatch)
    dropout = _run({"clip": name}, sixteen_examples, tmp_path / "dropout", *lora)
    assert dropout["feature_cache"]["text"] == (
        "cached in memory (eval): the hidden states entering layer 1, the first with LoRA; not for train: dropout "
        "text_model.embeddings.dropout (p=0.1) of the text tower is in train mode (and 3 more dropout modules)")
    assert len(calls) == 3 * 4 + 4  # every training epoch, the first evaluation only
    quiet_name = name.replace(f"text={bert}", f"text={quiet}")
    calls[:] = []
    off = _run({"clip": quiet_name}, sixteen_examples, tmp_path / "off", *lora, "train.feature_cache=off")
    calls_off, calls[:] = len(calls), []
    memory = _run({"clip": quiet_name}, sixteen_examples, tmp_path / "memory", *lora)
    assert (calls_off, len(calls)) == (3 * 4 + 4 * 4, 4 + 4)
    assert memory["feature_cache"]["text"] == ("cached in memory (train, eval): the hidden states entering layer 1, "
                                               "the first with LoRA")
    _same_training(memory, off)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_bert_style_split_is_the_text_towers_forward(model_type, attention):
    """`above(below(x))` at every layer is the whole encoder's forward + pooling, padding included, for each
    model type the split is written for and both attention implementations."""
    from types import SimpleNamespace

    import transformers as tf

    from mmpeft.backbones.dual import pool_text
    from mmpeft.models.partial_towers import PARTIAL_FAMILIES

    torch.manual_seed(0)
    config = tf.AutoConfig.for_model(model_type, vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                                     attn_implementation=attention)
    base = SimpleNamespace(text_model=tf.AutoModel.from_config(config).eval(), config=SimpleNamespace(pooling="mean"))
    split = PARTIAL_FAMILIES["dual"]["text"]
    assert split.unfit(base) is None
    inputs = {"input_ids": torch.randint(5, 99, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    inputs["attention_mask"][1, 6:] = 0
    with torch.no_grad():
        whole = pool_text(base.text_model(**inputs).last_hidden_state, inputs["attention_mask"], "mean").pooled
        for k in range(4):
            torch.testing.assert_close(split.above(base, k, split.below(base, k, inputs), inputs).pooled, whole)
    config = tf.AutoConfig.for_model("distilbert", vocab_size=99)
    other = SimpleNamespace(text_model=tf.AutoModel.from_config(config), config=base.config)
    assert split.unfit(other) == ("the text tower is a distilbert encoder; its split forward is written for bert, "
                                  "roberta, xlm-roberta")


def test_lora_layers_that_are_not_one_top_block_are_not_cached_and_say_so(tiny_dual, sixteen_examples, tmp_path):
    """LoRA on the middle layer of a 3-layer BERT text tower only: the layer above it runs from states that change,
    so nothing is cached, and the run says which layers carry LoRA."""
    import shutil

    import transformers as tf

    name = tiny_dual["torchvision"]
    bert = name.split(",")[0].removeprefix("dual:text=")
    deeper = tmp_path / "bert-3-layers"
    config = tf.BertConfig.from_pretrained(bert)
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    tf.BertModel(config).save_pretrained(deeper)
    for file in Path(bert).glob("*token*"):
        shutil.copy(file, deeper)
    for file in Path(bert).glob("vocab*"):
        shutil.copy(file, deeper)
    targets = r"model.text.lora.targets=text_model\.encoder\.layer\.1\.attention\.self\.query"
    run = _run({"clip": name.replace(f"text={bert}", f"text={deeper}")}, sixteen_examples, tmp_path / "middle",
               "model.text.mode=lora", targets, "train.max_steps=1", "head.hidden=0")
    assert run["feature_cache"]["text"] == ("not cached: LoRA on layers [1] of 3: not a contiguous top block "
                                            "(`model.text.lora.layers`)")

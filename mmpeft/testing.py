"""Tiny randomly initialised CLIP / SigLIP / BLIP checkpoints for tests and benchmarks: saved with
`save_pretrained`, they load offline through the same `from_pretrained` path a Hub id takes."""

from __future__ import annotations

import os
import pathlib
import string

import torch
import transformers as tf

from .backbones.tokenizers import clip_bpe_tokenizer

FAMILIES = ("clip", "siglip", "blip")

_WORDS = """
a an the this that these those some any all no one two three four five six seven eight nine ten many few more most
other another each every both either neither such same own only very just also too so not and or but if then than
of in on at by for with about against between into through during before after above below to from up down out off
over under again near far here there when where why how what which who whom whose it its he she they them his her
their we us our you your i me my is are was were be been being have has had do does did can could will would shall
should may might must photo picture image drawing painting sketch sculpture rendering cartoon closeup view scene
dog cat bird fish horse cow sheep pig goat chicken duck deer bear lion tiger elephant zebra giraffe monkey rabbit
mouse snake frog turtle insect butterfly bee ant spider man woman person people child boy girl baby family friend
car truck bus train plane boat ship bicycle motorcycle road street city town house building bridge tower church
tree flower grass leaf forest field mountain river lake sea ocean beach sky cloud sun moon star rain snow water fire
red orange yellow green blue purple pink brown black white gray grey gold silver dark light bright colorful
big small large little tall short long wide old new young good bad happy sad beautiful pretty ugly clean dirty
hot cold warm wet dry fast slow heavy soft hard day night morning evening today food fruit apple banana orange
bread cake pizza table chair bed sofa door window wall floor room kitchen garden park school shop market
sitting standing running walking flying swimming eating playing sleeping looking holding wearing riding
""".split()


def blip_wordpiece_tokenizer(max_length: int) -> tf.PreTrainedTokenizerBase:
    """Build a small BERT WordPiece tokenizer with BLIP's extra [DEC] (bos) and [ENC] tokens."""
    chars = list(dict.fromkeys(string.ascii_lowercase + string.digits + string.punctuation))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = list(dict.fromkeys(specials + chars + ["##" + c for c in chars] + _WORDS))
    return tf.BertTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        bos_token="[DEC]",
        extra_special_tokens=["[ENC]"],
        model_max_length=max_length,
    )


def build_tiny_backbone(
    family: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    projection_dim: int = 16,
    vocab_merges: int = 1000,
) -> pathlib.Path:
    """Build a tiny random ``family`` checkpoint (model, tokenizer, image processor) and save it to ``out_dir``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; valid families: {', '.join(FAMILIES)}")
    out = pathlib.Path(out_dir)
    tower = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
    )
    vision = dict(tower, image_size=image_size, patch_size=patch_size)
    square = {"height": image_size, "width": image_size}

    if family == "clip":
        tok = clip_bpe_tokenizer(vocab_merges, max_length=77)
        # eos must be the real <|endoftext|> id (not the legacy 2) so CLIP pools at the first EOS.
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        text = dict(tower, vocab_size=len(tok), max_position_embeddings=77, **ids)
        config = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
        model_cls = tf.CLIPModel
        processor = tf.CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=square)
    elif family == "siglip":
        # No sentencepiece model is available offline, so SigLIP gets a CLIP BPE tokenizer padded with eos.
        max_len = 16
        tok = clip_bpe_tokenizer(vocab_merges, max_length=max_len)
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        text = dict(tower, vocab_size=len(tok), max_position_embeddings=max_len, **ids)
        config = tf.SiglipConfig(text_config=text, vision_config=vision)
        model_cls = tf.SiglipModel
        processor = tf.SiglipImageProcessor(size=square)
    else:
        tok = blip_wordpiece_tokenizer(max_length=64)
        ids = dict(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.sep_token_id,
            sep_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id,
        )
        text = dict(tower, vocab_size=len(tok), max_position_embeddings=64, **ids)
        config = tf.BlipConfig(
            text_config=text,
            vision_config=vision,
            projection_dim=projection_dim,
            image_text_hidden_size=projection_dim,
        )
        model_cls = tf.BlipForImageTextRetrieval
        processor = tf.BlipImageProcessor(size=square)

    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def perturb_lora(model: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> None:
    """Fill every LoRA B matrix with seeded noise: peft starts B at zero, where an adapter changes nothing, so a
    saved, merged or embedded model could not tell a right adapter from a lost one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))

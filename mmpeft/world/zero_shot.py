"""Zero-shot evaluation of a CLIP-style checkpoint on the world: attribute classification from prompts."""

from __future__ import annotations

import itertools

import torch

from .scenes import (
    COLOURS,
    COUNTS,
    EXPRESSIONS,
    HELD_OUT,
    PLURALS,
    POSITIONS,
    SHAPES,
    WEATHERS,
    Scene,
    render,
    sample_scene,
    scene_rng,
)

# attribute -> (class names, how one scene reads that attribute)
ATTRIBUTES = {
    "colour": (tuple(COLOURS), lambda s: s.colour),
    "shape": (SHAPES, lambda s: s.shape),
    "colour+shape": (tuple(f"{c} {s}" for c, s in itertools.product(COLOURS, SHAPES)),
                     lambda s: f"{s.colour} {s.shape}"),
    "count": (tuple(COUNTS.values()), lambda s: COUNTS[s.count]),
    "position": (POSITIONS, lambda s: s.position),
    "weather": (WEATHERS, lambda s: s.weather),
    "expression": (EXPRESSIONS, lambda s: s.expression),  # scored on the faces only
}
_WEATHER_PROMPT = {"sunny": "on a sunny day", "cloudy": "on a cloudy day", "rainy": "in the rain",
                   "snowy": "in the snow", "night": "at night"}


def _prompts(attribute: str, name: str) -> list[str]:
    """Prompts for one class: an ensemble over the attributes the class does not fix (as CLIP's ensembles)."""
    if attribute == "colour":
        return [f"a photo of a {name} {s}" for s in SHAPES]
    if attribute == "shape":
        return [f"a photo of a {c} {name}" for c in COLOURS]
    if attribute == "colour+shape":
        return [f"a photo of a {name}"]
    if attribute == "count":
        n = {v: k for k, v in COUNTS.items()}[name]
        return [f"a photo of {name} {c} {s if n == 1 else PLURALS[s]}" for c in COLOURS for s in SHAPES]
    if attribute == "position":
        return [f"a photo of a {c} {s} on the {name}" if name != "center" else f"a photo of a {c} {s} in the center"
                for c in COLOURS for s in SHAPES]
    if attribute == "expression":
        return [f"a photo of a {name} {c} face" for c in COLOURS]
    return [f"a photo of a {c} {s} {_WEATHER_PROMPT[name]}" for c in COLOURS for s in SHAPES]


def evaluation_scenes(seed: int, n: int, *, held_out: bool) -> list[Scene]:
    """n scenes of held-out (or only seen) colour-shape pairs, from a stream pretraining never reads."""
    return [sample_scene(scene_rng(seed, i, f"zero-shot-{held_out}"), held_out=held_out) for i in range(n)]


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, pixel_fn, scenes: list[Scene], *, batch_size: int = 256) -> dict[str, dict]:
    """Accuracy and chance level per attribute of `model` (a transformers CLIPModel-like) on `scenes`.

    `pixel_fn(list_of_PIL) -> tensor` is the model's preprocessing.
    """
    model.eval()
    images = []
    for start in range(0, len(scenes), batch_size):
        pixels = pixel_fn([render(s) for s in scenes[start:start + batch_size]])
        images.append(torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1))
    images = torch.cat(images)
    results = {}
    for attribute, (names, read) in ATTRIBUTES.items():
        class_embeds = []
        for name in names:
            tokens = tokenizer(_prompts(attribute, name), padding=True, return_tensors="pt")
            text = torch.nn.functional.normalize(_features(model.get_text_features(**tokens)), dim=-1)
            class_embeds.append(torch.nn.functional.normalize(text.mean(0), dim=-1))
        keep = [i for i, s in enumerate(scenes) if read(s) is not None]
        if not keep:
            continue
        predicted = (images[keep] @ torch.stack(class_embeds).T).argmax(-1)
        truth = torch.tensor([names.index(read(scenes[i])) for i in keep])
        results[attribute] = {"accuracy": (predicted == truth).float().mean().item(), "chance": 1 / len(names),
                              "classes": len(names), "scenes": len(keep)}
    return results


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


__all__ = ["ATTRIBUTES", "HELD_OUT", "evaluation_scenes", "zero_shot_accuracy"]

"""How much each modality contributes to a fine-tuned dual encoder's predictions, by two measures side by side:

* permutation (the perceptual score, Gat et al. 2021): accuracy and macro-F1 when one modality is shuffled across
  the split's examples, and the share of predictions that change;
* Shapley shares (MM-SHAP, Parcalabescu & Frank 2023): Shapley values of the predicted-class logit over text tokens
  and image patch groups, T-SHAP = sum|phi_text| / (sum|phi_text| + sum|phi_image|), V-SHAP = 1 - T-SHAP.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..backbones.registry import TowerOutput
from ..errors import ConfigError
from ..training.metrics import classification_metrics
from .split import Encoded, ExplainSplit

MODALITIES = ("text", "image")


def _scores(labels: np.ndarray, preds: np.ndarray, names: list[str]) -> dict:
    m = classification_metrics(labels, preds, names)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def _subsets(split: ExplainSplit) -> dict[str, np.ndarray]:
    """'overall', 'class=<name>' and '<group column>=<value>' -> example indices."""
    out = {"overall": np.arange(len(split.labels))}
    for c, name in enumerate(split.label_names):
        out[f"class={name}"] = np.flatnonzero(split.labels == c)
    if split.groups:
        groups = np.array(split.groups)
        for value in sorted(set(split.groups)):
            out[f"{split.group_column}={value}"] = np.flatnonzero(groups == value)
    return out


@torch.no_grad()
def permutation_contribution(model, split: ExplainSplit, encoded: Encoded, *, permutations: int = 10,
                             seed: int = 0) -> dict:
    """The perceptual score of each modality, overall, per class, per group and per example."""
    n = len(split.labels)
    base = encoded.logits.argmax(-1).numpy()
    rng = np.random.default_rng(seed)
    whole = np.arange(n)
    result = {"permutations": permutations, "base": _scores(split.labels, base, split.label_names), "subsets": {},
              "per_example": {}}
    subsets = _subsets(split)
    for modality in MODALITIES:
        preds = []
        for _ in range(permutations):
            perm = rng.permutation(n)
            logits = encoded.fuse(model, perm if modality == "text" else whole, perm if modality == "image" else whole)
            preds.append(logits.argmax(-1).numpy())
        preds = np.stack(preds)  # (K, N)
        changed = preds != base
        result["per_example"][modality] = changed.mean(0).round(4).tolist()
        for name, idx in subsets.items():
            if len(idx) == 0:
                continue
            base_s = _scores(split.labels[idx], base[idx], split.label_names)
            runs = [_scores(split.labels[idx], p[idx], split.label_names) for p in preds]
            row = result["subsets"].setdefault(name, {"examples": int(len(idx))})
            entry = {}
            for metric in ("accuracy", "macro_f1"):
                values = np.array([r[metric] for r in runs])
                entry[f"{metric}_mean"], entry[f"{metric}_std"] = float(values.mean()), float(values.std())
                entry[f"{metric}_drop"] = float(base_s[metric] - values.mean())
            entry["perceptual_score"] = entry["accuracy_drop"] / base_s["accuracy"] if base_s["accuracy"] else 0.0
            share = changed[:, idx].mean(1)
            entry["changed_mean"], entry["changed_std"] = float(share.mean()), float(share.std())
            row[modality] = entry
    return result


def gate_weights(split: ExplainSplit, encoded: Encoded) -> dict | None:
    """The gated head's learned weights (text, image) averaged per subset; None for other heads."""
    if encoded.gates is None:
        return None
    return {name: {"text": float(encoded.gates[idx, 0].mean()), "image": float(encoded.gates[idx, 1].mean()),
                   "examples": int(len(idx))}
            for name, idx in _subsets(split).items() if len(idx)}


SCORES = ("logit", "centred_logit", "log_prob", "prob")


def score_of(logits: torch.Tensor, target: int, score: str) -> torch.Tensor:
    """The value a Shapley player moves: the target class's logit, that logit minus the mean logit (what softmax
    sees), or its log-probability."""
    if score == "logit":
        return logits[..., target]
    if score == "centred_logit":
        return logits[..., target] - logits.mean(-1)
    if score == "prob":
        return torch.softmax(logits, -1)[..., target]
    if score == "log_prob":
        return torch.log_softmax(logits, -1)[..., target]
    raise ConfigError(f"Shapley score {score!r} is not one of {', '.join(SCORES)}.")


# --- Shapley shares ---------------------------------------------------------------------------------------------

def mean_pixel_values(processor, like: torch.Tensor) -> torch.Tensor:
    """The processor's output for an image filled with its mean colour: what a masked patch group shows."""
    mean = getattr(processor, "image_mean", None)
    if mean is None:  # a torchvision transform: its Normalize step
        steps = getattr(getattr(processor, "transform", None), "transforms", [])
        mean = next((t.mean for t in steps if type(t).__name__ == "Normalize"), (0.5, 0.5, 0.5))
    colour = tuple(int(round(255 * float(m))) for m in mean)
    image = Image.new("RGB", (like.shape[-1] * 2, like.shape[-2] * 2), colour)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"][0].float()
    if pixels.shape != like.shape:  # a processor that crops differently: the constant colour is all that matters
        pixels = pixels.mean((1, 2), keepdim=True).expand(like.shape).clone()
    return pixels.to(like.device)


def text_players(model, input_ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Positions of one example's real tokens, BOS / EOS / padding excluded."""
    special = set(model.source.tokenizer.all_special_ids)
    return [i for i, (t, m) in enumerate(zip(input_ids.tolist(), mask.tolist())) if m and t not in special]


def masked_token_id(model) -> int | None:
    """The id a removed text player gets, or None to change only the attention mask.

    The pad token normally; but where the pad token is the end-of-text token of a family that pools at the first
    end-of-text token, it would move the pooled position: CLIP honours the attention mask, so the id stays;
    open_clip ignores the mask, so the token becomes 0, the id open_clip's own tokenizer pads with.
    """
    tokenizer = model.source.tokenizer
    pad = tokenizer.pad_token_id
    if pad is not None and pad == tokenizer.eos_token_id:
        return {"clip": None, "open_clip": 0}.get(model.family.name, pad)
    return pad


def patch_groups(height: int, width: int, side: int, step: int) -> list[tuple[slice, slice]]:
    """A side x side grid over the image, cell borders on multiples of the tower's patch size `step`."""
    rows = (np.linspace(0, height // step, side + 1).round() * step).astype(int)
    cols = (np.linspace(0, width // step, side + 1).round() * step).astype(int)
    rows[-1], cols[-1] = height, width
    return [(slice(rows[r], rows[r + 1]), slice(cols[c], cols[c + 1])) for r in range(side) for c in range(side)]


def patch_size(model) -> int:
    config = getattr(model.base.config, "vision_config", None)
    return int(getattr(config, "patch_size", 1) or 1) if config is not None else 1


def _unique_rows(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, inverse = np.unique(states, axis=0, return_inverse=True)
    return unique, inverse.reshape(-1)


def _tower_states(model, ids, mask, pixels, baseline, players, cells, text_states, image_states, chunk):
    """Encode each distinct text and image coalition once (batched per tower)."""
    text_out = image_out = None
    if model.head.uses_text:
        masked_id = masked_token_id(model)
        batch_ids = ids.repeat(len(text_states), 1)
        batch_mask = mask.repeat(len(text_states), 1)
        for j, pos in enumerate(players):
            absent = torch.as_tensor(~text_states[:, j], device=ids.device)
            batch_mask[absent, pos] = 0
            if masked_id is not None:
                batch_ids[absent, pos] = masked_id
        outs = [model.text_features(batch_ids[i:i + chunk], batch_mask[i:i + chunk])
                for i in range(0, len(text_states), chunk)]
        text_out = TowerOutput(*(torch.cat(parts) if parts[0] is not None else None for parts in zip(*outs)))
    if model.head.uses_image:
        batch = pixels.repeat(len(image_states), 1, 1, 1)
        for j, (rs, cs) in enumerate(cells):
            absent = torch.as_tensor(~image_states[:, j], device=pixels.device)
            fill = baseline[absent] if baseline.dim() == 4 else baseline
            batch[absent, :, rs, cs] = fill[..., rs, cs]
        outs = [model.image_features(batch[i:i + chunk]) for i in range(0, len(image_states), chunk)]
        image_out = TowerOutput(*(torch.cat(parts) if parts[0] is not None else None for parts in zip(*outs)))
    return text_out, image_out


def _take(out: TowerOutput | None, index: np.ndarray) -> TowerOutput | None:
    if out is None:
        return None
    index = torch.as_tensor(index)
    return TowerOutput(out.pooled[index], out.tokens[index], None if out.mask is None else out.mask[index])


def _t_shap(phi: np.ndarray, n_text: int) -> float:
    text, image = np.abs(phi[..., :n_text]).sum(-1), np.abs(phi[..., n_text:]).sum(-1)
    total = text + image
    return np.divide(text, total, out=np.full_like(total, 0.5, dtype=float), where=total > 0)


@torch.no_grad()
def shapley_example(model, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor, *, permutations: int,
                    rng: np.random.Generator, baseline: torch.Tensor | None = None, target: int | None = None,
                    chunk: int = 256, score: str = "logit") -> dict:
    """MM-SHAP of one example: Shapley values of the target logit over its text tokens and image patch groups
    (about as many groups as tokens), estimated from `permutations` sampled orderings of all players."""
    players = text_players(model, ids, mask) if model.head.uses_text else []
    n_text = len(players)
    side = max(1, round(math.sqrt(max(n_text, 1)))) if model.head.uses_image else 0
    cells = patch_groups(pixels.shape[-2], pixels.shape[-1], side, patch_size(model)) if side else []
    n = n_text + len(cells)
    if baseline is None and cells:
        baseline = mean_pixel_values(model.source.image_processor, pixels)
    orders = np.stack([rng.permutation(n) for _ in range(permutations)])  # (P, n)
    present = np.zeros((permutations, n + 1, n), dtype=bool)  # coalition after k players joined
    for p, order in enumerate(orders):
        for k, player in enumerate(order):
            present[p, k + 1:, player] = True
    states = present.reshape(-1, n)
    text_states, text_index = _unique_rows(states[:, :n_text])
    image_states, image_index = _unique_rows(states[:, n_text:])
    if baseline is not None and baseline.dim() == 4:  # background images: one drawn for each image coalition
        baseline = baseline[torch.as_tensor(rng.integers(0, len(baseline), size=len(image_states)))]
    text_out, image_out = _tower_states(model, ids[None], mask[None], pixels[None], baseline, players, cells,
                                        text_states, image_states, chunk)
    if not model.head.uses_text:
        text_out, text_index = model.text_features(None, None), None
    values = []
    for i in range(0, len(states), chunk):
        part = slice(i, i + chunk)
        text = text_out if text_index is None else _take(text_out, text_index[part])
        values.append(model.fuse(text, _take(image_out, image_index[part])).float().cpu())
    logits = torch.cat(values).reshape(permutations, n + 1, -1)
    target = int(logits[0, -1].argmax()) if target is None else target
    v = score_of(logits, target, score).numpy()
    samples = np.zeros((permutations, n))
    np.put_along_axis(samples, orders, np.diff(v, axis=1), axis=1)
    phi = samples.mean(0)
    boot = samples[rng.integers(0, permutations, size=(200, permutations))].mean(1)
    return {"target": target, "n_text": n_text, "n_image": len(cells), "grid": side,
            "phi_text": phi[:n_text].round(5).tolist(), "phi_image": phi[n_text:].round(5).tolist(),
            "phi_se": (samples.std(0, ddof=1) / math.sqrt(permutations) if permutations > 1 else np.zeros(n))
            .round(5).tolist(),
            "t_shap": float(_t_shap(phi, n_text)), "t_shap_se": float(np.std(_t_shap(boot, n_text))),
            "full_logit": float(v[0, -1]), "empty_logit": float(v[0, 0]), "forwards": int(len(text_states) +
                                                                                          len(image_states))}


def shapley_contribution(model, split: ExplainSplit, *, permutations: int = 10, examples: int | None = 300,
                         seed: int = 0, progress: bool = True, score: str = "logit", image_baseline: str = "mean"
                         ) -> dict:
    """MM-SHAP over (a seeded sample of) the split: per example and averaged overall, per class and per group."""
    rng = np.random.default_rng(seed)
    n = len(split.labels)
    chosen = np.sort(rng.choice(n, size=min(n, examples), replace=False)) if examples and examples < n else \
        np.arange(n)
    wanted = set(chosen.tolist())
    device = next(model.parameters()).device
    model.eval()
    per_example, baseline = {}, None
    bar = tqdm(total=len(chosen), desc="Shapley", disable=not progress, leave=False)
    for batch in split.loader:
        for row, index in enumerate(batch["index"].tolist()):
            if index not in wanted:
                continue
            pixels = batch["pixel_values"][row].to(device)
            if image_baseline == "data":  # the other images of the batch (interventional Shapley, as SHAP's
                others = [j for j in range(len(batch["index"])) if j != row]  # background data)
                baseline = batch["pixel_values"][others].to(device)
            elif baseline is None:
                baseline = mean_pixel_values(model.source.image_processor, pixels)
            ids, mask = batch["input_ids"][row].to(device), batch["attention_mask"][row].to(device)
            per_example[index] = shapley_example(model, ids, mask, pixels, permutations=permutations, rng=rng,
                                                 baseline=baseline, score=score)
            bar.update()
    bar.close()
    return summarize_shapley(split, per_example, permutations)


def summarize_shapley(split: ExplainSplit, per_example: dict[int, dict], permutations: int) -> dict:
    done = np.array(sorted(per_example))
    t_shap = np.array([per_example[i]["t_shap"] for i in done])
    subsets = {}
    for name, idx in _subsets(split).items():
        mask = np.isin(done, idx)
        if not mask.any():
            continue
        values = t_shap[mask]
        se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
        subsets[name] = {"examples": int(mask.sum()), "t_shap": float(values.mean()), "v_shap": float(1 - values.mean()),
                         "t_shap_se": se, "estimate_se": float(np.mean([per_example[i]["t_shap_se"]
                                                                         for i in done[mask]]))}
    return {"permutations": permutations, "examples": int(len(done)), "subsets": subsets,
            "forwards": int(sum(e["forwards"] for e in per_example.values())),
            "per_example": {int(i): per_example[i] for i in done}}


def modality_contribution(model, data, encoded: Encoded | None = None, *, permutations: int = 10,
                          shapley_permutations: int = 8, shapley_examples: int | None = 300, seed: int = 0,
                          image_baseline: str = "mean", progress: bool = True) -> dict:
    """Both measures side by side (and the gated head's weights): what the report's contribution table shows.
    `data` is a labelled manifest path or a `load_split` result; `shapley_permutations=0` skips Shapley."""
    from .split import encode_split, load_split

    split = data if isinstance(data, ExplainSplit) else load_split(model, data)
    encoded = encoded or encode_split(model, split, progress=progress)
    return {"permutation": permutation_contribution(model, split, encoded, permutations=permutations, seed=seed),
            "shapley": shapley_contribution(model, split, permutations=shapley_permutations,
                                            examples=shapley_examples, seed=seed, progress=progress,
                                            image_baseline=image_baseline)
            if shapley_permutations > 0 else None,
            "gates": gate_weights(split, encoded)}

"""The report's figures (matplotlib's object API: no pyplot, no global state): modality contribution, saliency
gallery, reliability diagram and confusion matrix. Each has a title, axis labels, a legend or a colour bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TEXT_COLOUR, IMAGE_COLOUR = "#1f77b4", "#ff7f0e"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def contribution_chart(contribution: dict, subsets: list[str], path: Path) -> Path:
    """Permutation (share of predictions changed) and Shapley shares (T-SHAP / V-SHAP) per subset."""
    fig = _figure(11, 4.2)
    left, right = fig.subplots(1, 2)
    perm = contribution["permutation"]["subsets"]
    x = np.arange(len(subsets))
    for k, (modality, colour) in enumerate((("text", TEXT_COLOUR), ("image", IMAGE_COLOUR))):
        means = [perm[s][modality]["changed_mean"] for s in subsets]
        stds = [perm[s][modality]["changed_std"] for s in subsets]
        left.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=stds, capsize=3, color=colour, label=f"{modality} permuted")
    left.set_title(f"Permutation: predictions changed ({contribution['permutation']['permutations']} permutations)")
    left.set_ylabel("share of predictions that change")
    left.set_ylim(0, 1)
    left.legend(loc="upper right")
    shapley = contribution.get("shapley")
    if shapley:
        t = np.array([shapley["subsets"].get(s, {}).get("t_shap", np.nan) for s in subsets])
        se = np.array([shapley["subsets"].get(s, {}).get("t_shap_se", 0.0) for s in subsets])
        right.bar(x, t, 0.6, color=TEXT_COLOUR, label="T-SHAP (text share)")
        right.bar(x, 1 - t, 0.6, bottom=t, color=IMAGE_COLOUR, label="V-SHAP (image share)")
        right.errorbar(x, t, yerr=se, fmt="none", ecolor="black", capsize=3, label="± standard error")
        right.axhline(0.5, color="grey", lw=0.8, ls="--")
        right.set_title(f"Shapley shares (MM-SHAP, {shapley['permutations']} permutations, "
                        f"{shapley['examples']} examples)")
        right.set_ylim(0, 1)
        right.set_ylabel("share of |Shapley value|")
        right.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    for ax in (left, right):
        ax.set_xticks(x, [s.replace("decided_by=", "decided by ") for s in subsets], rotation=30, ha="right")
    fig.savefig(path)
    return path


def _overlay(ax, image: Image.Image, heat: np.ndarray, title: str, cmap: str = "inferno"):
    ax.imshow(image)
    heat = np.asarray(heat, dtype=float)
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    shown = ax.imshow(heat, cmap=cmap, alpha=0.55, vmin=0, vmax=1, extent=(0, image.width, image.height, 0),
                      interpolation="bilinear")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return shown


def _tokens(ax, tokens: list[str], special: list[bool], scores: np.ndarray, title: str):
    """Tokens as highlighted text: the colour's strength is the token's score (special tokens in grey)."""
    from matplotlib import colormaps

    cmap = colormaps["Blues"]
    real = [abs(float(s)) for s, sp in zip(scores, special) if not sp]
    top = max(real) if real and max(real) > 0 else 1.0
    ax.axis("off")
    ax.set_title(title, fontsize=8, loc="left")
    x, y = 0.0, 0.6
    for token, is_special, score in zip(tokens, special, scores):
        if is_special:
            continue
        strength = min(abs(float(score)) / top, 1.0)
        text = ax.text(x, y, token, fontsize=9, transform=ax.transAxes, va="center",
                       bbox={"boxstyle": "round,pad=0.15", "fc": cmap(0.1 + 0.8 * strength), "ec": "none"},
                       color="white" if strength > 0.6 else "black")
        x += 0.0078 * (len(token) + 1.5)
        if x > 0.9:
            x, y = 0.0, y - 0.5
    return text


def saliency_gallery(entries: list[dict], path: Path, title: str) -> Path:
    """One row per example: the image, each image map over it, and below the caption's tokens by text relevance."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    order = ["relevance", "rollout", "gradcam", "gradxinput"]
    methods = sorted({m for e in entries for m in e["saliency"].image}, key=order.index)
    cols = 1 + len(methods)
    fig = _figure(2.2 * cols + 1.2, 3.0 * len(entries) + 0.4)
    grid = fig.add_gridspec(len(entries) * 2, cols + 1, height_ratios=[4, 1] * len(entries),
                            width_ratios=[1] * cols + [0.08])
    for r, entry in enumerate(entries):
        sal, image = entry["saliency"], entry["image"]
        ax = fig.add_subplot(grid[2 * r, 0])
        ax.imshow(image)
        ax.axis("off")
        ax.set_title(f"row {entry['row']}: true {entry['label']}, predicted\n{entry['pred']} "
                     f"(p={entry['confidence']:.2f})" + (f", {entry['group']}" if entry.get("group") else ""),
                     fontsize=8)
        for c, method in enumerate(methods, start=1):
            if method in sal.image:
                _overlay(fig.add_subplot(grid[2 * r, c]), image, sal.image[method], f"image {method}")
        text_method = next((m for m in ("relevance", "gradxinput") if m in sal.text), None)
        if text_method:
            _tokens(fig.add_subplot(grid[2 * r + 1, :cols]), sal.tokens, sal.special, sal.text[text_method],
                    f"text {text_method} over the caption's tokens (darker = more relevant)")
    fig.colorbar(ScalarMappable(Normalize(0, 1), "inferno"), cax=fig.add_subplot(grid[:2, cols]),
                 label="relevance (each map scaled to [0, 1])")
    fig.suptitle(title)
    fig.savefig(path)
    return path


def reliability_chart(calibration: dict, path: Path) -> Path:
    fig = _figure(10, 4.2)
    left, right = fig.subplots(1, 2)
    bins = [b for b in calibration["reliability"]["bins"] if b["count"]]
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    width = calibration["reliability"]["bins"][0]["high"] - calibration["reliability"]["bins"][0]["low"]
    left.bar(centres, [b["accuracy"] for b in bins], width * 0.9, color=TEXT_COLOUR, label="accuracy in bin")
    left.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    left.scatter(centres, [b["confidence"] for b in bins], color="black", s=12, zorder=3, label="mean confidence")
    for centre, b in zip(centres, bins):
        left.text(centre, min(b["accuracy"], 0.93) + 0.02, f"n={b['count']}", ha="center", fontsize=7, rotation=90)
    left.set_xlim(0, 1)
    left.set_ylim(0, 1.08)
    left.set_xlabel("confidence (max softmax probability)")
    left.set_ylabel("accuracy")
    left.set_title(f"Reliability diagram (ECE {calibration['reliability']['ece']:.4f}, "
                   f"{sum(b['count'] for b in bins)} examples)")
    left.legend(loc="upper left", fontsize=8)
    matrix = np.array(calibration["metrics"]["confusion_matrix"])
    names = calibration["metrics"]["labels"]
    shown = right.imshow(matrix, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            right.text(j, i, str(matrix[i, j]), ha="center", va="center",
                       color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    right.set_xticks(range(len(names)), names, rotation=30, ha="right")
    right.set_yticks(range(len(names)), names)
    right.set_xlabel("predicted")
    right.set_ylabel("true")
    right.set_title("Confusion matrix")
    fig.colorbar(shown, ax=right, label="examples")
    fig.savefig(path)
    return path

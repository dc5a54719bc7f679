"""The hidden states entering a tower's first LoRA layer, per example: each later epoch runs only the adapted layers.

A tower with LoRA on its last N layers computes the same states below layer L-N every epoch (nothing there
trains, nothing there is random: `partial_cache_blockers` checks). `StateCache.output` keeps them the first time
an example is seen and from then on runs only `PartialTower.above` from them, so the pooled output, the token
states and the gradients of the LoRA weights are those of the whole tower. Text rows are kept at their own length
(the positions the attention mask marks); a batch assembled from them is padded to the batch's own length, as the
uncached batch is. The states at padding positions are zeros there: the padding mask hides them from every real
position, and the pooling reads a real one (the EOS token), so no output that is read changes.

Like `FeatureCache`, the states live in memory or, once complete, memory-mapped under `root/<key>/`
(`cache_files.py`: raw bytes, the rows' lengths, and a `complete.json` written last).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..backbones.registry import TowerOutput
from ..errors import TrainingError
from .cache_files import is_complete, read_complete, write_complete
from .partial_towers import PartialTower

logger = logging.getLogger(__name__)


class StateCache:
    """The states entering layer `below_layer` of one tower for the `size` examples of one split."""

    def __init__(self, key: str, size: int, split: PartialTower, below_layer: int,
                 root: str | os.PathLike | None = None):
        self.key, self.size, self.split, self.below_layer = key, size, split, below_layer
        self.folder = Path(root) / key if root is not None else None
        self.rows: list[torch.Tensor | None] = [None] * size
        self.filled = 0
        if is_complete(self.folder):
            self._read()

    @property
    def complete(self) -> bool:
        return self.filled == self.size

    def output(self, base: nn.Module, index: torch.Tensor, inputs: dict) -> TowerOutput:
        """The tower's output for the batch's examples (`index`: their rows), from the cached states where every
        row is cached, else from the inputs (keeping the states)."""
        rows = index.tolist()
        mask = inputs.get("attention_mask")
        if all(self.rows[i] is not None for i in rows):
            states = self._assemble(rows, mask, index.device)
        else:
            with torch.no_grad():  # nothing below the first adapted layer trains
                states = self.split.below(base, self.below_layer, inputs)
            self._store(rows, states.detach(), mask)
        return self.split.above(base, self.below_layer, states, inputs)

    def _store(self, rows: list[int], states: torch.Tensor, mask: torch.Tensor | None) -> None:
        keep = mask.bool().to(states.device) if mask is not None else None
        for j, i in enumerate(rows):
            if self.rows[i] is None:
                self.filled += 1
            self.rows[i] = (states[j] if keep is None else states[j][keep[j]]).to("cpu").clone()
        if self.complete and self.folder is not None:
            self._write()

    def _assemble(self, rows: list[int], mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The batch's states: stacked (vision), or each text row written back at its mask's positions of a batch
        padded to the mask's length, zeros at padding positions."""
        cached = [self.rows[i] for i in rows]
        if mask is None:
            return torch.stack(cached).to(device)
        keep = mask.bool().to("cpu")
        lengths = keep.sum(1).tolist()
        for i, row, n in zip(rows, cached, lengths):
            if row.shape[0] != n:
                raise TrainingError(f"The cached states of example {i} cover {row.shape[0]} tokens, but its batch "
                                    f"has {n}: its text changed since they were cached. Set "
                                    "`train.feature_cache=off` and report this.")
        states = torch.zeros((*keep.shape, cached[0].shape[-1]), dtype=cached[0].dtype)
        states[keep] = torch.cat(cached)
        return states.to(device)

    def _write(self) -> None:
        """Every row end to end (each is (positions, width)) with their lengths, in `cache_files`' form."""
        meta = {"lengths": [row.shape[0] for row in self.rows], "below_layer": self.below_layer}
        if write_complete(self.folder, "states", torch.cat(self.rows), meta):
            logger.info("state cache %s complete: %d examples below layer %d", self.folder, self.size,
                        self.below_layer)

    def _read(self) -> None:
        flat, meta = read_complete(self.folder)
        self.rows = list(torch.split(flat, meta["lengths"]))
        self.filled = self.size

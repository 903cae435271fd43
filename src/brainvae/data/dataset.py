"""Batches from a slice store: memory-mapped images, conditions from the manifest.

No DataLoader workers and no copy of the dataset: each batch gathers its rows
from the memory map (sorted for locality), which on a laptop or a cluster node
is faster than worker processes for 2-D slices.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..conditions import conditions_of
from ..errors import BrainVAEError
from .resize import resize_images
from .store import SliceStore


class SliceBatches:
    """The slices of one split with their conditions; ``batch(rows)`` returns tensors on ``device``."""

    def __init__(self, store: SliceStore, split: str | None, image_size: int, device: torch.device | str = "cpu"):
        self.store = store
        self.split = split
        self.rows = store.indices(split)
        if len(self.rows) == 0:
            raise BrainVAEError(f"{store.path}: split {split!r} has no slices")
        self.images = store.images
        self.cond = {k: torch.tensor(v, dtype=torch.float32)
                     for k, v in conditions_of(store.manifest.iloc[self.rows]).items()}  # {key: (N,)}
        self.image_size = image_size
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
        """``idx`` indexes this split (0..len-1). Returns x (B, 1, S, S) float32 and cond {key: (B,)}."""
        idx = np.asarray(idx)
        order = np.argsort(self.rows[idx])
        idx = idx[order]
        x = resize_images(torch.from_numpy(np.ascontiguousarray(self.images[self.rows[idx]]))[:, None],
                          self.image_size)  # (B, 1, S, S)
        cond = {k: v[idx].to(self.device) for k, v in self.cond.items()}
        return x.to(self.device), cond

    def epoch_order(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """A permutation fixed by (seed, epoch); with DDP each rank takes every world-th element."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self), generator=g).numpy()
        return perm[rank::world]

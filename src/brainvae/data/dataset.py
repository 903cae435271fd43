"""Batches from a slice store: memory-mapped images, conditions from the manifest.

No DataLoader workers and no copy of the dataset: each batch gathers its rows
from the memory map (sorted for locality), which on a laptop or a cluster node
is faster than worker processes for 2-D slices.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .store import SliceStore

SEX_CODE = {"M": 1.0, "F": -1.0}


class SliceBatches:
    """The slices of one split with their conditions; ``batch(rows)`` returns tensors on ``device``."""

    def __init__(self, store: SliceStore, split: str | None, image_size: int, device: torch.device | str = "cpu"):
        self.store = store
        self.rows = store.indices(split)
        if len(self.rows) == 0:
            raise ValueError(f"{store.path}: split {split!r} has no slices")
        self.images = store.images
        m = store.manifest.iloc[self.rows]
        self.cond = {
            "age": torch.tensor(m["age"].to_numpy(dtype=float), dtype=torch.float32),
            "sex": torch.tensor(m["sex"].map(SEX_CODE).fillna(0.0).to_numpy(dtype=float), dtype=torch.float32),
            "position": torch.tensor(m["position"].to_numpy(dtype=float), dtype=torch.float32),
        }
        self.image_size = image_size
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
        """``idx`` indexes this split (0..len-1). Returns x (B, 1, S, S) float32 and cond {key: (B,)}."""
        idx = np.asarray(idx)
        order = np.argsort(self.rows[idx])
        idx = idx[order]
        x = torch.from_numpy(np.ascontiguousarray(self.images[self.rows[idx]]))[:, None]  # (B, 1, H, W)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
        cond = {k: v[idx].to(self.device) for k, v in self.cond.items()}
        return x.to(self.device), cond

    def epoch_order(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """A permutation fixed by (seed, epoch); with DDP each rank takes every world-th element."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self), generator=g).numpy()
        return perm[rank::world]

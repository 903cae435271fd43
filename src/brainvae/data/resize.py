"""One rule for resizing slices to the size a network takes (a model, the feature net, a classifier).

Area averaging when shrinking (each output pixel is the mean of the input
pixels it covers: anti-aliased, exact block means for integer factors),
bilinear interpolation when enlarging. Masks are resized the same way, then a
pixel is in the mask where at least half of it was.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def resize_images(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(n, H, W) array or (n, 1, H, W) tensor -> (n, 1, size, size) float32 (area down, bilinear up)."""
    x = images.float() if torch.is_tensor(images) else torch.tensor(np.asarray(images, np.float32))
    x = x if x.dim() == 4 else x[:, None]
    if x.shape[-1] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W) 0/1 masks -> (n, size, size) bool: resized like images, then at least half in."""
    return resize_images(masks, size)[:, 0].numpy() >= 0.5


def read_resized(array: np.ndarray, rows: np.ndarray, size: int, chunk: int = 512) -> np.ndarray:
    """``array[rows]`` of an (N, H, W) array (a store's memory map is fine), in the given order, resized to
    (len(rows), size, size) float32; read in sorted order, ``chunk`` rows at a time."""
    rows = np.asarray(rows)
    out = np.empty((len(rows), size, size), np.float32)
    order = np.argsort(rows)  # sorted reads are sequential on a memory map
    for start in range(0, len(rows), chunk):
        sel = order[start:start + chunk]
        out[sel] = resize_images(np.ascontiguousarray(array[rows[sel]], dtype=np.float32), size)[:, 0].numpy()
    return out

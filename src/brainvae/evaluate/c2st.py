"""Classifier two-sample test (C2ST): can a small CNN tell two sets of slices apart?

Lopez-Paz & Oquab 2017, "Revisiting Classifier Two-Sample Tests" (ICLR): train
a binary classifier to tell set A from set B on one half of each, and measure
it on the other halves. If A and B come from one distribution no classifier
does better than chance, so held-out accuracy (and ROC AUC) stay near 0.5; the
further above 0.5, the easier the sets are to tell apart. Unlike a distance in
a fixed feature space, the classifier finds whatever differs (blur, texture,
intensity, anatomy), and the number reads the same for every model.

    from brainvae.evaluate.c2st import c2st
    result = c2st(samples, real, seed=0)   # (N, H, W), (M, H, W) float32 in [0, 1]
    result["accuracy"], result["auc"]      # ~0.5: indistinguishable; ~1.0: trivially told apart

The classifier (``C2STNet``) sees every pixel at full resolution: a 4 x 4,
stride-4 "patchify" stem (as in ConvNeXt) keeps it cheap while high-frequency
differences (blur, noise, texture) stay visible to the learned filters, then
three stride-2 3 x 3 convolutions with BatchNorm and global average pooling.
BatchNorm (not GroupNorm) because per-image normalisation would divide out a
global intensity scale, which is one of the differences the test must see.

With ``groups_a`` / ``groups_b`` (e.g. subject ids) the halves are split by
group, so a classifier cannot score above chance by recognising subjects it
saw in training; with fewer than two groups in a set it falls back to a split
by slice.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F

from ..data.resize import resize_images

STEPS = 300
BATCH_SIZE = 64
MAX_EPOCHS = 50  # on tiny sets more passes only memorise them


class C2STNet(nn.Module):
    """(B, 1, S, S) -> (B,) logits of "from set B"; S a multiple of 4 (any S works, smaller maps are padded)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()]

        self.features = nn.Sequential(
            nn.Conv2d(1, w, 4, stride=4, bias=False), nn.BatchNorm2d(w), nn.SiLU(),  # (B, w, S/4, S/4)
            *block(w, 2 * w),  # (B, 2w, S/8, S/8)
            *block(2 * w, 4 * w),  # (B, 4w, S/16, S/16)
            *block(4 * w, 4 * w),  # (B, 4w, S/32, S/32)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 4w)
        )
        self.out = nn.Linear(4 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))[:, 0]


def split_halves(n: int, rng: np.random.Generator, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled indices of range(n) in two halves (train, test); with ``groups``, whole groups go to one half.

    Groups (in random order) fill the first half until it holds at least n // 2
    items, so the halves are as even as the group sizes allow.
    """
    if groups is None or len(np.unique(groups)) < 2:
        perm = rng.permutation(n)
        return perm[:n // 2], perm[n // 2:]
    groups = np.asarray(groups)
    first = np.zeros(n, bool)
    for g in rng.permutation(np.unique(groups)):
        if first.sum() >= n // 2:
            break
        first |= groups == g
    return rng.permutation(np.flatnonzero(first)), rng.permutation(np.flatnonzero(~first))


def c2st(a: np.ndarray, b: np.ndarray, *, seed: int = 0, steps: int = STEPS, batch_size: int = BATCH_SIZE,
         size: int | None = None, lr: float = 2e-3, max_epochs: int = MAX_EPOCHS,
         groups_a: np.ndarray | None = None, groups_b: np.ndarray | None = None) -> dict:
    """Held-out accuracy and ROC AUC of a CNN trained to tell slices ``a`` from slices ``b``.

    a: (N, H, W), b: (M, H, W) float32 in [0, 1] (resized to ``size`` px when given,
    ``data.resize``). min(N, M) slices of each set are used (classes
    balanced), each set is split in halves (``split_halves``; by group when
    groups are given), the classifier trains ``steps`` AdamW steps (batches of
    ``batch_size``, half-and-half in expectation, cosine schedule; at most
    ``max_epochs`` passes over the training halves) on the first halves and is
    scored on the second halves, truncated to equal sizes.

    Deterministic for a seed (on one machine and thread count); torch's global
    RNG is forked, so the caller's random stream is untouched.

    Returns {"accuracy", "auc", "n_train", "n_test", "steps", "split_by_group": {"a", "b"}}:
    n_train / n_test count slices per class; ``steps`` is the number of steps
    run; ``split_by_group`` says which sets were split by group (rather than by
    slice).
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"c2st needs two (n, H, W) sets of one image size, got {a.shape} and {b.shape}")
    k = min(len(a), len(b))
    if k < 4:
        raise ValueError(f"c2st needs at least 4 slices in each set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    pick_a, pick_b = rng.choice(len(a), k, replace=False), rng.choice(len(b), k, replace=False)  # balanced classes
    ga = None if groups_a is None else np.asarray(groups_a)[pick_a]
    gb = None if groups_b is None else np.asarray(groups_b)[pick_b]
    # b first: calls with one seed, one b and sets of one size use the same halves of b (a shared reference set)
    train_b, test_b = split_halves(k, rng, gb)
    train_a, test_a = split_halves(k, rng, ga)
    n_train, n_test = min(len(train_a), len(train_b)), min(len(test_a), len(test_b))
    if n_train < 2 or n_test < 1:
        raise ValueError(f"c2st: halves too small to train and test ({n_train} / {n_test} slices per class)")

    def images(x: np.ndarray, rows: np.ndarray) -> torch.Tensor:  # (n, 1, S, S)
        return resize_images(x[np.sort(rows)], size or x.shape[-1])

    x_train = torch.cat([images(a, pick_a[train_a[:n_train]]), images(b, pick_b[train_b[:n_train]])])  # (2n, 1, S, S)
    x_test = torch.cat([images(a, pick_a[test_a[:n_test]]), images(b, pick_b[test_b[:n_test]])])
    y_train = torch.cat([torch.zeros(n_train), torch.ones(n_train)])  # 1 = from b
    y_test = np.r_[np.zeros(n_test), np.ones(n_test)]

    batch = min(batch_size, len(x_train))
    steps = min(steps, max_epochs * -(-len(x_train) // batch))  # -(-a // b): ceil(a / b), steps per epoch
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = C2STNet()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        net.train()
        perm, pos = torch.randperm(len(x_train), generator=g), 0
        for _ in range(steps):
            if pos + batch > len(perm):  # a fresh permutation each epoch
                perm, pos = torch.randperm(len(x_train), generator=g), 0
            idx = perm[pos:pos + batch]
            pos += batch
            loss = F.binary_cross_entropy_with_logits(net(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(x_test[i:i + 256]) for i in range(0, len(x_test), 256)]).numpy()  # (2 n_test,)
    return {"accuracy": float(np.mean((logits > 0) == (y_test > 0.5))),
            "auc": float(roc_auc_score(y_test, logits)),
            "n_train": int(n_train), "n_test": int(n_test), "steps": int(steps),
            "split_by_group": {"a": ga is not None and len(np.unique(ga)) > 1,
                               "b": gb is not None and len(np.unique(gb)) > 1}}

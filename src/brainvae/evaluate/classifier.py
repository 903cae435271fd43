"""A small slice CNN with several heads, and its fixed-budget trainer.

Shared by conditional fidelity (an age regressor + sex classifier judging
samples) and utility (sex / age-band classifiers trained on real and synthetic
slices). Inputs are slices resized to ``image_size`` (64 px by default) so the
whole training set fits in memory and trains in a minute or two on a laptop CPU.

    heads = (Head("age"), Head("sex", classes=2))
    net, info = train_cnn(x, {"age": ages, "sex": sexes}, heads, TrainSettings(steps=600),
                          x_val, val_targets)
    pred = predict(net, x_test)   # {"age": (N,) years, "sex": (N, 2) probabilities}

Missing targets are masked out of the loss: NaN for a regression head, -1 for
a classification head, so slices without a label still train the other heads.

No augmentation: on IXI, random zoom / intensity gain removed signal (brain
size and intensity carry age and sex) and even small shifts and rotations did
not beat plain training with validation-selected weights (age r 0.64 vs 0.68).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from ..progress import bar as progress_bar



@dataclass(frozen=True)
class Head:
    """One output of the CNN: ``classes == 0`` is a regression, ``>= 2`` a classification."""

    name: str
    classes: int = 0


@dataclass(frozen=True)
class TrainSettings:
    """A fixed training budget: the same for every arm of a comparison."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 20
    eval_every: int = 0  # > 0: validate this often and keep the weights with the best ``val_score``; 0: final weights
    seed: int = 0


class SliceCNN(nn.Module):
    """(B, 1, S, S) -> {head: (B,) regression or (B, classes) logits}.

    ``stages`` stride-2 stages (3x3 convs, GroupNorm, SiLU; a second conv in
    all but the first stage) doubling ``width``, then global average pooling and one linear layer per head.
    Regression heads predict standardised targets; ``loc``/``scale`` buffers
    carry the training mean and std so ``predict`` returns user units.
    """

    def __init__(self, heads: tuple[Head, ...], width: int = 16, stages: int = 4):
        super().__init__()
        self.heads = tuple(heads)
        layers, c_in = [], 1
        for i in range(stages):
            c = width * 2 ** i
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            if i > 0:  # no second conv at the largest resolution, where it would cost the most
                layers += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1))
        self.out = nn.ModuleDict({h.name: nn.Linear(c_in, h.classes or 1) for h in self.heads})
        for h in self.heads:
            if not h.classes:
                self.register_buffer(f"loc_{h.name}", torch.zeros(()))
                self.register_buffer(f"scale_{h.name}", torch.ones(()))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)  # (B, C)
        return {h.name: self.out[h.name](f)[:, 0] if not h.classes else self.out[h.name](f) for h in self.heads}


def _head_losses(net: SliceCNN, out: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    """Sum over heads of the mean loss over slices that have that head's label (a scalar)."""
    total = out[net.heads[0].name].new_zeros(())
    for h in net.heads:
        y = targets[h.name]
        if h.classes:
            keep = y >= 0
            if keep.any():
                total = total + F.cross_entropy(out[h.name][keep], y[keep].long())
        else:
            keep = torch.isfinite(y)
            if keep.any():
                z = (y[keep] - getattr(net, f"loc_{h.name}")) / getattr(net, f"scale_{h.name}")
                total = total + F.smooth_l1_loss(out[h.name][keep], z)
    return total


def _as_tensors(targets: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, Tensor]:
    return {k: torch.as_tensor(np.asarray(v)[idx], dtype=torch.float32) for k, v in targets.items()}


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (non-negative integer labels).

    Equal to ``sklearn.metrics.balanced_accuracy_score`` (without its warning
    when ``y_pred`` has classes ``y_true`` lacks), ~50x faster for bootstraps.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    k = int(max(y_true.max(), y_pred.max())) + 1
    support = np.bincount(y_true, minlength=k)
    hits = np.bincount(y_true[y_true == y_pred], minlength=k)
    present = support > 0
    return float((hits[present] / support[present]).mean())


def val_score(net: SliceCNN, x: np.ndarray, targets: dict[str, np.ndarray]) -> float:
    """Mean over heads of Pearson r (regression) or balanced accuracy (classification); higher is better.

    Used to select weights instead of the validation loss, which rises early
    from over-confidence while r and accuracy still improve (seen on IXI).
    """
    pred, scores = predict(net, x), []
    for h in net.heads:
        y = np.asarray(targets[h.name])
        if h.classes:
            keep = y >= 0
            if keep.any():
                scores.append(balanced_accuracy(y[keep].astype(np.int64), pred[h.name][keep].argmax(1)))
        else:
            keep = np.isfinite(y)
            if keep.sum() > 1 and np.ptp(y[keep]) > 0 and np.ptp(pred[h.name][keep]) > 0:
                scores.append(float(np.corrcoef(y[keep], pred[h.name][keep])[0, 1]))
            else:
                scores.append(0.0)
    return float(np.mean(scores)) if scores else 0.0


def train_cnn(x: np.ndarray, targets: dict[str, np.ndarray], heads: tuple[Head, ...], settings: TrainSettings,
              x_val: np.ndarray | None = None, val_targets: dict[str, np.ndarray] | None = None, *,
              width: int = 16, progress: bool = False, desc: str = "classifier") -> tuple[SliceCNN, dict]:
    """Train a ``SliceCNN`` for exactly ``settings.steps`` AdamW steps (cosine schedule), on CPU.

    x: (N, S, S) float32; targets: {head: (N,)} (NaN / -1 = missing). Batches
    are drawn epoch by epoch from a permutation fixed by ``settings.seed``; the
    initial weights come from the same seed. With ``eval_every`` and validation
    data, the weights with the highest ``val_score`` are returned. Returns
    (net in eval mode, {"steps", "best_step", "val_score"}).
    """
    g = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = SliceCNN(heads, width=width)
    for h in heads:  # standardise regression targets with the training mean / std
        if not h.classes:
            y = np.asarray(targets[h.name], dtype=float)
            y = y[np.isfinite(y)]
            if len(y):
                getattr(net, f"loc_{h.name}").fill_(float(y.mean()))
                getattr(net, f"scale_{h.name}").fill_(float(max(y.std(), 1e-6)))
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(settings.warmup, 1))
                                              * 0.5 * (1 + math.cos(math.pi * min(s / max(settings.steps, 1), 1.0))))
    validate = settings.eval_every > 0 and x_val is not None and len(x_val) > 0
    best = (-math.inf, 0, None)  # (val score, step, state)
    perm, pos = torch.randperm(len(x), generator=g).numpy(), 0
    net.train()
    # the dropout masks come from torch's global RNG: fork it so a caller's stream is untouched and runs repeat
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + 1)
        for step in progress_bar(range(settings.steps), desc=desc, disable=not progress, leave=False):
            if pos + settings.batch_size > len(perm):
                perm, pos = torch.randperm(len(x), generator=g).numpy(), 0
            idx = np.sort(perm[pos:pos + settings.batch_size])
            pos += settings.batch_size
            out = net(torch.from_numpy(x[idx])[:, None])  # x[idx]: (B, S, S)
            loss = _head_losses(net, out, _as_tensors(targets, idx))
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
            sched.step()
            if validate and ((step + 1) % settings.eval_every == 0 or step + 1 == settings.steps):
                score = val_score(net, x_val, val_targets)
                net.train()
                if score > best[0]:
                    best = (score, step + 1, copy.deepcopy(net.state_dict()))
    if best[2] is not None:
        net.load_state_dict(best[2])
    info = {"steps": settings.steps, "best_step": best[1] if validate else settings.steps,
            "val_score": None if not validate else round(best[0], 5)}
    return net.eval(), info


@torch.no_grad()
def predict(net: SliceCNN, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """{head: (N,) regression in user units, or (N, classes) probabilities} for x (N, S, S)."""
    net.eval()
    parts: dict[str, list[np.ndarray]] = {h.name: [] for h in net.heads}
    for start in range(0, len(x), batch_size):
        out = net(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))[:, None])
        for h in net.heads:
            if h.classes:
                parts[h.name].append(out[h.name].softmax(1).numpy())
            else:
                loc, scale = getattr(net, f"loc_{h.name}"), getattr(net, f"scale_{h.name}")
                parts[h.name].append((out[h.name] * scale + loc).numpy())
    return {k: np.concatenate(v) if v else np.empty((0,)) for k, v in parts.items()}

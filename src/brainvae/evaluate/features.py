"""Feature spaces for comparing real and generated slices, none of which needs a download.

1. ``featnet``: a small CNN trained once per store on its training split and
   cached with the store (``<store>/features/featnet-<hash>.safetensors``).
   Objective (multi-task, self-supervised apart from the manifest's slice
   position): (a) regress the slice ``position`` (0..1) and (b) classify which
   of ``DEGRADATIONS`` was applied to the input. The pretext task (b), in the
   spirit of Gidaris et al. 2018 ("Unsupervised representation learning by
   predicting image rotations"), makes the 128-d features sensitive to what
   generative models get wrong: blur, noise, lost resolution, contrast.
   The position head also orders unconditional samples by anatomy.
2. ``radiomics``: hand-crafted intensity, texture (GLCM, Haralick et al. 1973)
   and shape numbers inside the brain, standardised with train statistics.
   Samples have no brain mask, so "brain" is intensity > ``FOREGROUND`` (0.05)
   for real and generated slices alike (background is 0 after preparation).
3. ``pca64``: PCA of 32-px thumbnails fitted on training slices.
4. A user-supplied TorchScript extractor (``--extractor model.pt``).

Images are (n, H, W) float in [0, 1] throughout; features are (n, d) float64.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage, stats
from skimage.feature import graycomatrix, graycoprops
from torch import nn
from torch.nn import functional as F
from ..progress import bar as progress_bar

from ..data.resize import resize_images
from ..data.store import SliceStore
from ..errors import BrainVAEError, InputFileError
from ..io.atomic import atomic_path
from .realism import FOREGROUND, thumbnails

FEATNET_VERSION = "featnet-v1"
FEATNET_SIZE = 64  # px, every image is resized to this before the feature net
DEGRADATIONS = ("none", "blur1", "blur2", "noise", "downup", "gamma")


@dataclass(frozen=True)
class FeatNetConfig:
    """What defines a feature net; its hash names the cache file."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    channels: tuple[int, ...] = (16, 32, 64, 128)
    position_weight: float = 10.0  # MSE on 0..1 is small next to cross-entropy
    seed: int = 0


class FeatNet(nn.Module):
    """(B, 1, 64, 64) -> 128-d features (global average pool of 4 conv stages) + two heads."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:  # each stage halves the size: 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.position = nn.Linear(c_in, 1)
        self.degradation = nn.Linear(c_in, len(DEGRADATIONS))

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, S, S) -> (B, C)
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, torch.sigmoid(self.position(f))[:, 0], self.degradation(f)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    g = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))


def degrade(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply ``DEGRADATIONS[labels[i]]`` to x[i]; x: (B, 1, 64, 64) in [0, 1]; pixels of the 64-px image."""
    out = x.clone()
    for k, name in enumerate(DEGRADATIONS):
        sel = labels == k
        if name == "none" or not sel.any():
            continue
        xs = x[sel]
        if name == "blur1":
            xs = _blur(xs, 1.0)
        elif name == "blur2":
            xs = _blur(xs, 2.0)
        elif name == "noise":  # sigma 0.03..0.08
            sigma = 0.03 + 0.05 * torch.rand(len(xs), 1, 1, 1, generator=generator)
            xs = xs + sigma * torch.randn(xs.shape, generator=generator)
        elif name == "downup":  # lose half or three quarters of the resolution
            f = 2 if torch.rand(1, generator=generator).item() < 0.5 else 4
            xs = F.interpolate(F.avg_pool2d(xs, f), scale_factor=f, mode="bilinear", align_corners=False)
        elif name == "gamma":  # gamma 0.6 or 1.6: a contrast change
            g = torch.where(torch.rand(len(xs), 1, 1, 1, generator=generator) < 0.5, 0.6, 1.6)
            xs = xs.clamp(min=0) ** g
        out[sel] = xs.clamp(0, 1)
    return out


def store_fingerprint(store: SliceStore) -> str:
    """A cheap identity of a store's content: manifest, config, array header and a strided sample of slices."""
    h = hashlib.sha256()
    for name in ("manifest.csv", "prepare.toml"):
        file = store.path / name
        if file.exists():
            h.update(file.read_bytes())
    images = store.images
    h.update(repr((images.shape, str(images.dtype))).encode())
    step = max(1, len(images) // 256)
    h.update(np.ascontiguousarray(images[::step]).tobytes())
    return h.hexdigest()


def home_cache_dir() -> Path:
    """``$BRAINVAE_CACHE/features`` (default ~/.cache/brainvae/features): for stores that are read-only."""
    return Path(os.environ.get("BRAINVAE_CACHE", "~/.cache/brainvae")).expanduser() / "features"


def cache_dir(store: SliceStore) -> Path:
    """Where per-store models (feature net, age / sex predictors) are cached: ``<store>/features`` when
    writable, else ``home_cache_dir()``."""
    folder = store.path / "features"
    try:
        folder.mkdir(exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    folder = home_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def featnet_key(store: SliceStore, cfg: FeatNetConfig) -> str:
    spec = {"version": FEATNET_VERSION, "size": FEATNET_SIZE, "degradations": DEGRADATIONS, "config": asdict(cfg),
            "store": store_fingerprint(store)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_featnet(store: SliceStore, cfg: FeatNetConfig, progress: bool = True) -> tuple[FeatNet, dict]:
    """Train the feature net on the store's training split (fixed seed and step count; CPU)."""
    rows = store.indices("train")
    if len(rows) == 0:
        raise BrainVAEError(f"{store.path}: no training split to train the feature network on")
    positions = store.manifest["position"].to_numpy(dtype=np.float32)
    images = store.images
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = FeatNet(cfg.channels)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1), pct_start=0.1)
    net.train()
    log = {}
    for step in progress_bar(range(cfg.steps), desc="feature net", unit="step", disable=not progress):
        batch = np.sort(rng.choice(rows, size=min(cfg.batch_size, len(rows)), replace=len(rows) < cfg.batch_size))
        x = resize_images(np.ascontiguousarray(images[batch]), FEATNET_SIZE)
        pos = torch.from_numpy(np.nan_to_num(positions[batch], nan=0.5))
        labels = torch.randint(0, len(DEGRADATIONS), (len(batch),), generator=g)
        _, pred_pos, logits = net(degrade(x, labels, g))
        loss_pos = F.mse_loss(pred_pos, pos)
        loss_deg = F.cross_entropy(logits, labels)
        loss = cfg.position_weight * loss_pos + loss_deg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log = {"position_mse": loss_pos.item(), "degradation_ce": loss_deg.item(),
               "degradation_accuracy": float((logits.argmax(1) == labels).float().mean())}
    return net.eval(), log


def load_or_train_featnet(store: SliceStore, cfg: FeatNetConfig = FeatNetConfig(),
                          progress: bool = True) -> tuple[FeatNet, dict]:
    """The store's cached feature net, trained on first use. Returns (net, info with path and trained_now)."""
    from safetensors.torch import load_file, save_file

    key = featnet_key(store, cfg)
    folder = cache_dir(store)
    weights, meta = folder / f"featnet-{key}.safetensors", folder / f"featnet-{key}.json"
    net = FeatNet(cfg.channels)
    if weights.exists() and meta.exists():
        net.load_state_dict(load_file(str(weights)))
        info = json.loads(meta.read_text())
        return net.eval(), {**info, "path": str(weights), "trained_now": False}
    net, log = train_featnet(store, cfg, progress)
    info = {"version": FEATNET_VERSION, "input_size": FEATNET_SIZE, "degradations": list(DEGRADATIONS),
            "objective": "MSE(position) * position_weight + cross-entropy(degradation class), on train slices",
            "config": asdict(cfg), "store": str(store.path), "final_batch": log}
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    with atomic_path(meta) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    return net, {**info, "path": str(weights), "trained_now": True}


@torch.no_grad()
def featnet_features(net: FeatNet, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, W) -> features (n, 128) and predicted positions (n,)."""
    feats, pos = [], []
    for start in range(0, len(images), batch_size):
        f, p, _ = net(resize_images(images[start:start + batch_size], FEATNET_SIZE))
        feats.append(f.double().numpy())
        pos.append(p.double().numpy())
    return np.concatenate(feats), np.concatenate(pos)


# --- radiomics ---------------------------------------------------------------------------------------

GLCM_DISTANCES = (1, 2, 4)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation", "dissimilarity")
GLCM_LEVELS = 16
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def radiomics_names() -> list[str]:
    return (["mean", "std"] + [f"p{q}" for q in PERCENTILES] + ["skewness", "kurtosis", "entropy"]
            + [f"glcm_{p}_d{d}" for d in GLCM_DISTANCES for p in GLCM_PROPS]
            + ["area", "grad_mean", "grad_std", "grad_p90"])


def radiomics_one(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Hand-crafted features of one (H, W) image inside its brain (``mask``, else intensity > FOREGROUND).

    Intensity statistics, a 32-bin entropy, GLCM properties on 16 grey levels
    averaged over 4 angles at distances 1, 2, 4 px (background excluded: it is
    level 0 and its row/column are dropped), brain area fraction and Sobel
    gradient-magnitude statistics. An empty brain gives zeros.
    """
    image = np.asarray(image, np.float64)
    mask = image > FOREGROUND if mask is None else np.asarray(mask, bool)
    names = radiomics_names()
    if mask.sum() < 2:
        return np.zeros(len(names))
    v = image[mask]
    hist = np.histogram(v, bins=32, range=(0, 1))[0] / v.size
    hist = hist[hist > 0]
    std = v.std()
    out = [v.mean(), std, *np.percentile(v, PERCENTILES),
           stats.skew(v) if std > 1e-8 else 0.0, stats.kurtosis(v) if std > 1e-8 else 0.0, -(hist * np.log2(hist)).sum()]
    levels = np.where(mask, 1 + np.minimum((np.clip(image, 0, 1) * (GLCM_LEVELS - 1)).astype(int), GLCM_LEVELS - 2), 0)
    glcm = graycomatrix(levels.astype(np.uint8), GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS, symmetric=True)
    glcm = glcm[1:, 1:].astype(np.float64)  # drop pairs touching the background
    empty = glcm.sum((0, 1)) == 0  # (distances, angles)
    glcm[:, :, empty] = 1.0  # avoid 0/0; such entries are zeroed below
    for d in range(len(GLCM_DISTANCES)):
        for prop in GLCM_PROPS:
            values = np.nan_to_num(graycoprops(glcm, prop)[d])  # (angles,)
            values[empty[d]] = 0.0
            out.append(values.mean())
    grad = np.hypot(ndimage.sobel(image, 0), ndimage.sobel(image, 1))[mask]
    out += [mask.mean(), grad.mean(), grad.std(), np.percentile(grad, 90)]
    return np.nan_to_num(np.asarray(out, np.float64))


def radiomics(images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """(n, H, W) -> (n, len(radiomics_names())) raw (unstandardised) features."""
    return np.stack([radiomics_one(img, None if masks is None else masks[i]) for i, img in enumerate(images)])


@dataclass
class Standardiser:
    """z-scores with statistics of a reference (training) set."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardiser":
        std = x.std(0)
        return cls(x.mean(0), np.where(std > 1e-12, std, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


# --- PCA ---------------------------------------------------------------------------------------------

def fit_pca(train_images: np.ndarray, components: int = 64, thumb: int = 32, seed: int = 0):
    """PCA of 32-px thumbnails of training slices (n, H, W); ``pca_features`` projects with it."""
    from sklearn.decomposition import PCA

    x = thumbnails(train_images, thumb)
    return PCA(n_components=min(components, len(x) - 1, x.shape[1]), random_state=seed).fit(x)


def pca_features(pca, images: np.ndarray, thumb: int = 32) -> np.ndarray:
    return pca.transform(thumbnails(images, thumb)).astype(np.float64)


# --- user extractor ----------------------------------------------------------------------------------

class TorchScriptExtractor:
    """A user's TorchScript feature extractor: (B, C, H, W) -> any output, flattened to (B, d).

    Images are fed as (B, 1, H, W) at the evaluated size; if the model rejects
    one channel (e.g. a first conv with 3 input channels) the channel is
    repeated three times, and ``input_note`` says which was used.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputFileError(self.path, "extractor file not found")
        try:
            self.module = torch.jit.load(str(self.path), map_location="cpu").eval()
        except Exception as exc:  # torch raises RuntimeError / ValueError for non-TorchScript files
            raise InputFileError(self.path, "not a TorchScript model (save one with torch.jit.script(m).save(path)); "
                                 f"torch.jit.load said: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                 ) from None
        self.channels: int | None = None
        self.input_note = ""

    @staticmethod
    def _flatten(out) -> torch.Tensor:
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return out.float().flatten(1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
        feats = []
        for start in range(0, len(images), batch_size):
            x = torch.as_tensor(np.asarray(images[start:start + batch_size], np.float32))[:, None]
            if self.channels is None:
                try:
                    out = self.module(x)
                    self.channels, self.input_note = 1, "fed (B, 1, H, W)"
                except Exception as exc1:
                    try:
                        out = self.module(x.repeat(1, 3, 1, 1))
                        self.channels = 3
                        self.input_note = "one channel was rejected; fed the image repeated to (B, 3, H, W)"
                    except Exception as exc3:
                        raise InputFileError(self.path, f"the extractor fails on (B, 1, H, W) ({exc1}) and on "
                                             f"(B, 3, H, W) ({exc3})") from None
            else:
                out = self.module(x if self.channels == 1 else x.repeat(1, 3, 1, 1))
            feats.append(self._flatten(out).double().numpy())
        return np.concatenate(feats)

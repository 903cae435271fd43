"""Embedded figures: captions with orientation letters, enlarged sample grids, and the page's size budget.

Every PNG is embedded as a base64 ``data:`` URI. :func:`fit_budget` re-encodes
them compactly (grey images as 8-bit grey, colour ones as 256-colour palettes)
and, when the page is still over its budget, downscales all of them by one
common factor; each image keeps its displayed size.
"""

from __future__ import annotations

import base64
import io
import math
import re

import numpy as np
from PIL import Image

from .figures import ORIENTATION
from .html import esc, png_data_uri

PAGE_BUDGET = 5_000_000  # bytes of HTML for up to six runs; more runs get a proportionally larger budget
BUDGET_RUNS = 6
MIN_SCALE = 0.25  # images are never downscaled below a quarter of their width
_IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def compact_png(data: bytes, scale: float = 1.0) -> bytes:
    """The PNG re-encoded small: 8-bit grey when R = G = B, else a 256-colour palette; resized by ``scale``."""
    image = Image.open(io.BytesIO(data))
    rgb = image.convert("RGB")
    if scale < 1:
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(rgb)  # (H, W, 3) uint8
    if (pixels == pixels[..., :1]).all():
        out = rgb.convert("L")
    else:
        out = rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue() if len(buf.getvalue()) < len(data) or scale < 1 else data


def budget_for(n_runs: int) -> int:
    return PAGE_BUDGET * max(1, math.ceil(n_runs / BUDGET_RUNS))


def fit_budget(html: str, budget: int) -> str:
    """Re-encode every embedded PNG of ``html`` compactly; downscale them all when the page exceeds ``budget``.

    Each ``<img>`` gets its original pixel width as ``width`` so the page looks the same.
    """
    found = list(_IMG.finditer(html))
    originals = [base64.b64decode(m.group(1)) for m in found]
    widths = [Image.open(io.BytesIO(d)).width for d in originals]
    text_bytes = len(html.encode("utf-8")) - sum(len(m.group(1)) for m in found)
    scale = 1.0
    while True:
        pngs = [compact_png(d, scale) for d in originals]
        image_bytes = sum(4 * math.ceil(len(p) / 3) for p in pngs)  # base64
        if text_bytes + image_bytes <= budget or scale <= MIN_SCALE:
            break
        # bytes shrink roughly with the area: aim a little below the budget
        scale = max(MIN_SCALE, scale * math.sqrt(0.9 * max(budget - text_bytes, 1) / image_bytes))
    parts, last = [], 0
    for m, png, width in zip(found, pngs, widths):
        parts += [html[last:m.start()], f'<img src="{png_data_uri(png)}" width="{width}"']
        last = m.end()
    return "".join(parts) + html[last:]


def orientation_key(axis: str | None) -> str:
    """The letters at the edges of every slice in a figure (A/P, R/L, S/I), as a small HTML key."""
    if axis not in ORIENTATION:
        return ""
    top, bottom, left, right = ORIENTATION[axis]
    return (f"<span class='orient' title='{esc(axis)} slices: {top} at the top, {left} on the left'>"
            f"<b>{top}</b><i>{left}</i><i>{right}</i><b>{bottom}</b></span>")


def image_html(data: bytes, caption: str, *, axis: str | None = None, min_width: int = 0) -> str:
    """An embedded PNG with its caption (and orientation letters for slices of ``axis``).

    An image narrower than ``min_width`` is shown enlarged by a whole factor with crisp pixels
    (sample grids of 32 to 128 px slices).
    """
    width = int.from_bytes(data[16:20], "big") if data[12:16] == b"IHDR" else 0
    style = ""
    if 0 < width < min_width:
        style = f' style="width: {width * math.ceil(min_width / width)}px; image-rendering: pixelated"'
    key = orientation_key(axis)
    cap = f"<figcaption>{key}{esc(caption)}</figcaption>" if caption or key else ""
    return f'<figure><img src="{png_data_uri(data)}" alt="{esc(caption)}"{style}>{cap}</figure>'

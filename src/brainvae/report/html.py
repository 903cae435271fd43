"""Small helpers for self-contained HTML pages: escaped text, tables, embedded PNGs.

Every page built with these opens in any browser without a network: figures
are embedded as base64 ``data:`` URIs and the CSS and scripts (package files
in ``report/assets/``) are inlined.
"""

from __future__ import annotations

import base64
import html
import io
from importlib import resources

import pandas as pd
from matplotlib.figure import Figure


def asset(name: str) -> str:
    """The text of a file in ``brainvae/report/assets/`` (CSS or JavaScript inlined into pages)."""
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def esc(text: object) -> str:
    """HTML-escape any value's text (quotes included)."""
    return html.escape(str(text), quote=True)


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """Render a matplotlib figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def png_data_uri(fig_or_bytes: Figure | bytes) -> str:
    """A ``data:image/png;base64,...`` URI for a figure or for PNG bytes."""
    data = fig_or_bytes if isinstance(fig_or_bytes, bytes) else png_bytes(fig_or_bytes)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_html(fig_or_bytes: Figure | bytes, caption: str = "") -> str:
    """An embedded image with an optional (escaped) caption."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{png_data_uri(fig_or_bytes)}" alt="{esc(caption)}">{cap}</figure>'


def table_html(df: pd.DataFrame, *, index: bool = False, float_format: str = "{:.4g}", classes: str = "") -> str:
    """A pandas table as HTML, cell text escaped, floats formatted, NaN shown empty; ``classes`` for CSS."""
    return df.to_html(index=index, escape=True, na_rep="", border=0, classes=classes or None,
                      float_format=lambda v: float_format.format(v))


def list_html(items: list[str], *, empty: str = "None.") -> str:
    """A bulleted list of escaped strings, or ``empty`` when there are none."""
    if not items:
        return f'<p class="muted">{esc(empty)}</p>'
    return "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>"


def notice(text: str) -> str:
    """A prominent warning box."""
    return f'<div class="notice">{esc(text)}</div>'


def page(title: str, body_html: str, *, css: str = "", script: str = "") -> str:
    """A complete HTML document with inline CSS; ``body_html`` is inserted as is (already escaped).

    ``css`` is appended to the shared style sheet; ``script`` is inline JavaScript run at the end of
    the body. Every page carries ``assets/self_check.js`` (no network, nothing sent anywhere).
    """
    tail = f"<script>\n{script}\n</script>\n" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{asset('page.css')}{css}</style>\n"
            f"<script>{asset('self_check.js')}</script>\n"
            f"</head>\n<body>\n<h1>{esc(title)}</h1>\n{body_html}\n{tail}</body>\n</html>\n")

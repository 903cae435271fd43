"""Small helpers for self-contained HTML pages: escaped text, tables, embedded PNGs.

Every page built with these opens in any browser without a network: figures
are embedded as base64 ``data:`` URIs and the CSS is inline.
"""

from __future__ import annotations

import base64
import html
import io

import pandas as pd
from matplotlib.figure import Figure

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
.notice { background: #fff3cd; border: 2px solid #e0a800; padding: .8em 1em; font-weight: bold; margin: 1em 0; }
.muted { color: #666; }
"""


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


def table_html(df: pd.DataFrame, *, index: bool = False, float_format: str = "{:.4g}") -> str:
    """A pandas table as HTML, cell text escaped, floats formatted, NaN shown empty."""
    return df.to_html(index=index, escape=True, na_rep="", border=0,
                      float_format=lambda v: float_format.format(v))


def list_html(items: list[str], *, empty: str = "None.") -> str:
    """A bulleted list of escaped strings, or ``empty`` when there are none."""
    if not items:
        return f'<p class="muted">{esc(empty)}</p>'
    return "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>"


def notice(text: str) -> str:
    """A prominent warning box."""
    return f'<div class="notice">{esc(text)}</div>'


# Records script errors, console errors and whether every image decoded into data attributes of
# <body> (data-errors, data-images-ok="decoded/total"), so a headless browser's --dump-dom shows them.
SELF_CHECK_JS = """
(function () {
  var errors = [];
  function note(msg) { errors.push(String(msg)); if (document.body) document.body.dataset.errors = errors.join(" | "); }
  window.addEventListener("error", function (e) { note(e.message || ("resource failed: " + (e.target && e.target.src))); }, true);
  window.addEventListener("unhandledrejection", function (e) { note("unhandled rejection: " + e.reason); });
  var consoleError = console.error;
  console.error = function () { note(Array.prototype.join.call(arguments, " ")); consoleError.apply(console, arguments); };
  window.addEventListener("load", function () {
    var imgs = document.images, ok = 0;
    for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
    document.body.dataset.imagesOk = ok + "/" + imgs.length;
    document.body.dataset.errors = errors.join(" | ");
  });
})();
"""


def page(title: str, body_html: str, *, css: str = "", script: str = "") -> str:
    """A complete HTML document with inline CSS; ``body_html`` is inserted as is (already escaped).

    ``css`` is appended to the shared style sheet; ``script`` is inline JavaScript run at the end of
    the body. Every page carries :data:`SELF_CHECK_JS` (no network, nothing sent anywhere).
    """
    tail = f"<script>\n{script}\n</script>\n" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{_CSS}{css}</style>\n<script>{SELF_CHECK_JS}</script>\n"
            f"</head>\n<body>\n<h1>{esc(title)}</h1>\n{body_html}\n{tail}</body>\n</html>\n")

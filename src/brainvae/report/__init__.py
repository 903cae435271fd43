"""Self-contained HTML reports built from output folders (never recomputing results).

:mod:`brainvae.report.html` holds the page-building helpers shared by every report.
"""

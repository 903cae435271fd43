"""Self-contained HTML reports built from output folders (never recomputing results).

``report`` assembles the page of ``brainvae report`` from ``read`` (run folders through RunDir, stores),
``headline`` (headline numbers and verdicts), ``overview`` (sections across runs), ``sections`` (per run),
``tables``, ``images`` (embedding and the size budget) and ``figures``. ``quiz`` is the visual Turing test.
``html`` holds the page-building helpers shared by every page; CSS and JavaScript live in ``assets/``.
"""

"""The coordinator's dashboard: a read-only live web page (and JSON API) over a RUN folder.

``fed-unimiss aggregator dashboard --out RUN`` or ``aggregator start --dashboard ADDRESS``.
:mod:`.data` reads the RUN folder, :mod:`.server` serves it (Starlette + uvicorn, token gate),
``static/`` holds the page and the vendored uPlot (MIT, ``static/vendor/uPlot.LICENSE``).
"""

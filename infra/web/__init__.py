"""incidentd's HTTP front door: one aiohttp application per process (:func:`infra.web.app.make_app`).

Routes live in one ``web.RouteTableDef`` per area (``ingest.py`` now; the incident API and the pages
later), shared state in typed ``web.AppKey``s, errors as ``application/problem+json``. It is an adapter
like the brokers: requests are validated with the worker's own :class:`CommandFactory` and published with
the broker's publisher; the worker does the rest. See docs/ingest.md.
"""

"""The hub: coordinators register spokes and algorithms, define and launch experiments,
and read aggregated results.

Layout, in layers (imports go downwards; the one exception, ``db`` auditing a schema
migration through ``services.audit``, is imported lazily):

- entry points, peers: ``main`` (the web app: API and pages, by default also consuming
  results), ``consumer`` (the results consumer, runnable as a process of its own) and
  ``worker`` (the aggregation tasks' bodies, and the Celery worker's app);
- ``api/`` (REST routes) and ``web/`` (HTML pages), both over ``deps`` (FastAPI
  dependencies) and ``signin`` (throttled sign-in, cookies, CSRF);
- ``services/`` (publishing, per-message result ingestion, aggregation, read models);
  they enqueue background work through ``tasks`` (the Celery app; imports no service);
- ``models`` (tables) and ``schemas`` (the API's bodies) beside them, ``aggregation/``
  (the pure aggregation engine), ``db``, ``settings``, ``migrations/``;
- ``commands/``: the ``tributary hub`` commands that start them."""

__version__ = "0.1.0"

"""The hub: coordinators register spokes and algorithms, define and launch experiments,
and read aggregated results. Layout: ``models`` (tables), ``api/`` (REST routes),
``services/`` (publishing, result ingestion, aggregation), ``web`` (HTML pages)."""

__version__ = "0.1.0"

"""The spoke: the agent an institution runs next to its data. Layout: ``config`` (the
site's settings), ``sources`` (folder and DICOMweb inputs), ``store`` (screening,
de-identification, the content-addressed store), ``catalog`` (the SQLite index cohorts are
selected from), ``ingest`` (sources into store and catalog), ``deid`` (the
de-identification engine), ``participant`` (the per-case JSON), ``images`` (pull and
verify by digest), ``runner`` (the isolated container), ``journal`` (the durable journal
and outbox), ``outbox``, ``liveness``, ``steward`` (the site's data steward), ``counts``
(federated counts from the catalog), ``agent`` (the queue consumer)."""

__version__ = "0.1.0"

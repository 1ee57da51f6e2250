"""The spoke: the agent an institution runs next to its data. Layout: ``config`` (the
site's settings), ``sources`` (folder and DICOMweb inputs), ``store`` (screening,
de-identification, the content-addressed store), ``catalog`` (the SQLite index cohorts are
selected from), ``ingest`` (sources into store and catalog), ``deid`` (the
de-identification engine), ``participant`` (the per-case JSON), ``images`` (pull and
verify by digest), ``runner`` (the isolated container), ``journal`` (the durable journal
and outbox), ``outbox``, ``liveness`` (heartbeats, progress, the cases running now),
``lifecycle`` (experiment states with their statuses, the audit log, wake-ups: the object
the other parts receive), ``control`` (what each message from the hub does),
``admission`` (image checks and cohort before an experiment is accepted), ``cases`` (the
cohort by released ids, each case's participant JSON and mounts), ``execution`` (one
case's container to its signed result), ``steward`` (the site's data steward), ``counts``
(federated counts from the catalog), ``agent`` (the queue consumer and its threads)."""

__version__ = "0.1.0"

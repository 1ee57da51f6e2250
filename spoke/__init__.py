"""The spoke: the agent an institution runs next to its data. Layout: ``config`` (the
site's settings), ``cohort`` (finding cases), ``deid`` (de-identification), ``participant``
(the per-case JSON), ``images`` (pull and verify by digest), ``runner`` (the isolated
container), ``journal`` (what was already done), ``agent`` (the queue consumer)."""

"""The site's data-release policy applied to a failure before it leaves the spoke."""

from __future__ import annotations

from tributary.protocol.messages import Failure


def released_failure(failure: Failure | None, log_tails: bool) -> Failure | None:
    """The failure as it may leave: without its log tail, marked withheld, when the site
    withholds log tails (a tail may echo patient data the algorithm printed)."""
    if failure is None or log_tails:
        return failure
    return failure.model_copy(update={"log_tail": None, "log_withheld": True})

"""The site's data-release policy applied to a failure before it leaves the spoke."""

from __future__ import annotations

from pydantic import ValidationError

from tributary.protocol.messages import AppliedLimits, Failure, RunLimits


def released_failure(failure: Failure | None, log_tails: bool) -> Failure | None:
    """The failure as it may leave: without its log tail, marked withheld, when the site
    withholds log tails (a tail may echo patient data the algorithm printed)."""
    if failure is None or log_tails:
        return failure
    return failure.model_copy(update={"log_tail": None, "log_withheld": True})


def with_applied_limits(failure: Failure | None, limits: RunLimits) -> Failure | None:
    """The failure carrying the limits the case ran under (after the site's caps), so the
    developer sees those rather than the ones the study asked for."""
    if failure is None:
        return None
    try:
        applied = AppliedLimits(memory_mb=limits.memory_mb, cpus=limits.cpus,
                                timeout_seconds=limits.timeout_seconds, gpus=limits.gpus,
                                tmp_mb=limits.tmp_mb)
    except ValidationError:  # a site limit outside the reportable range: report none
        return failure
    return failure.model_copy(update={"applied_limits": applied})

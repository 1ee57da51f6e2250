"""A site that withholds log tails sends none and says so."""

from __future__ import annotations

from tributary.protocol.messages import Failure, FailureReason
from tributary.spoke.config import ReleasePolicy
from tributary.spoke.failure_release import released_failure


def test_withheld_log_tail_is_dropped_and_marked() -> None:
    failure = Failure(reason=FailureReason.EXIT_CODE, detail="exit 3", exit_code=3,
                      log_tail="patient 1234 not found")
    withheld = released_failure(failure, log_tails=False)
    assert withheld is not None and withheld.log_tail is None and withheld.log_withheld
    assert withheld.exit_code == 3 and withheld.detail == "exit 3"
    assert released_failure(failure, log_tails=True) == failure
    assert released_failure(None, log_tails=False) is None


def test_log_tails_are_released_by_default() -> None:
    assert ReleasePolicy().log_tails is True
    assert ReleasePolicy.model_validate({"log_tails": False}).log_tails is False


def test_failure_carries_the_applied_limits() -> None:
    from tributary.protocol.messages import RunLimits
    from tributary.spoke.failure_release import with_applied_limits

    failure = Failure(reason=FailureReason.TIMEOUT, detail="ran out of time")
    limits = RunLimits(timeout_seconds=30, memory_mb=256, cpus=1.0)
    applied = with_applied_limits(failure, limits)
    assert applied is not None and applied.applied_limits is not None
    assert applied.applied_limits.timeout_seconds == 30
    assert applied.applied_limits.memory_mb == 256
    assert with_applied_limits(None, limits) is None

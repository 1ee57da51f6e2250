"""Broker destinations. Each spoke has its own durable queue; all spokes report to one
results queue that only the hub consumes."""

from tributary.protocol.messages import validate_spoke_id

RESULTS_QUEUE = "/queue/tributary.results"
DEAD_LETTER_PREFIX = "DLQ."


def spoke_queue(spoke_id: str) -> str:
    return f"/queue/tributary.spoke.{validate_spoke_id(spoke_id)}"


def dead_letter_queue(destination: str) -> str:
    """The per-queue dead-letter queue the broker configuration sets up."""
    return f"/queue/{DEAD_LETTER_PREFIX}{destination.removeprefix('/queue/')}"

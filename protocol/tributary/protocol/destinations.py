"""Broker destinations. Each spoke has its own durable queue; all spokes report to one
results queue that only the hub consumes.

Every name lives under a *federation* namespace, so one broker can carry several
federations (or several test runs) without one hub consuming another's results.
"""

import re

from tributary.protocol.messages import validate_spoke_id

DEFAULT_FEDERATION = "tributary"
DEAD_LETTER_PREFIX = "DLQ."
FEDERATION_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")


def validate_federation(name: str) -> str:
    if not FEDERATION_RE.fullmatch(name):
        raise ValueError(f"invalid federation name {name!r}: lower-case letters, digits and "
                         "'-', starting with a letter, at most 40 characters")
    return name


def results_group(spoke_id: str) -> dict[str, str]:
    """Headers that put a spoke's messages on the results queue in one message group: the
    broker hands a group to one consumer at a time, in order, and to another consumer only
    when that one goes away. A hub with several results consumers thus still reads each
    spoke's custody chain in order."""
    return {"JMSXGroupID": validate_spoke_id(spoke_id)}


def results_queue(federation: str = DEFAULT_FEDERATION) -> str:
    return f"/queue/{validate_federation(federation)}.results"


def spoke_queue(spoke_id: str, federation: str = DEFAULT_FEDERATION) -> str:
    return f"/queue/{validate_federation(federation)}.spoke.{validate_spoke_id(spoke_id)}"


def dead_letter_queue(destination: str) -> str:
    """The per-queue dead-letter queue the broker configuration sets up."""
    return f"/queue/{DEAD_LETTER_PREFIX}{destination.removeprefix('/queue/')}"


#: The results queue of the default federation.
RESULTS_QUEUE = results_queue()

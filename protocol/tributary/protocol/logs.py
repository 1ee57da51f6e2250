"""One logging format for every Tributary process (hub, consumer, worker, spoke), so that
an operator reading several roles' logs side by side sees the same layout."""

from __future__ import annotations

import logging


def configure(verbose: bool = False) -> None:
    """Log to standard error at INFO (DEBUG when verbose); stomp.py's chatter only from
    WARNING, since every reconnect attempt would otherwise fill the log."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("stomp").setLevel(logging.WARNING)

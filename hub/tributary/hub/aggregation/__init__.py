"""The aggregation engine: aggregators (plain classes registered by name), the statistics
they use, small-cell suppression and the report shape. Database and task queue live in
``hub/services/aggregation.py`` and ``hub/worker.py``."""

from tributary.hub.aggregation import binary, detection, summary  # noqa: F401  (register)
from tributary.hub.aggregation.base import (
    AGGREGATORS,
    Aggregator,
    AggregatorParameterError,
    CaseView,
    get_aggregator,
    load_plugins,
    register,
)
from tributary.hub.aggregation.engine import Aggregate, run
from tributary.hub.aggregation.report import POOLED, AggregateRead, Figure, GroupReport

load_plugins()  # aggregators other distributions declare as entry points

__all__ = ["AGGREGATORS", "POOLED", "Aggregate", "AggregateRead", "Aggregator",
           "AggregatorParameterError", "CaseView", "Figure", "GroupReport", "get_aggregator",
           "register", "run"]

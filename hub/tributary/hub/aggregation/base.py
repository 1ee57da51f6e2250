"""What an aggregator is, the registry that finds one by name, and the helpers every
aggregator shares (field look-up, figures with intervals)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from tributary.hub.aggregation.partial import Sums
from tributary.hub.aggregation.report import Column, Figure, GroupReport, RocCurve
from tributary.hub.aggregation.statistics import proportion_ci
from tributary.hub.models import CaseState

ENTRY_POINT_GROUP = "tributary.aggregators"


@dataclass(frozen=True)
class CaseView:
    """One case as an aggregator sees it: no database row, only what the spoke sent."""

    spoke_id: str
    case_id: str
    state: CaseState
    output: dict[str, Any] | None
    released: dict[str, Any]
    failure: dict[str, Any] | None


class NoParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AggregatorParameterError(ValueError):
    """The experiment's aggregator parameters do not fit the aggregator."""


class Aggregator:
    """Turns the cases of one group into figures. Subclasses set ``name``, ``Parameters``
    (a pydantic model of the experiment's ``aggregator_parameters``) and override
    ``figures`` (and ``roc`` if they rank scores). They never see the database, other groups
    or the suppression rule: the engine applies k afterwards, from each figure's ``n``.

    An ``incremental`` aggregator splits its figures in two: those computed from exact
    running sums (``contribution`` of each succeeded case, added up, then ``sum_figures``),
    which ingest keeps up to date per result at constant cost, and those that need every
    value (``full_figures``, with ``roc``), recomputed only in periodic full passes;
    ``figures`` must equal ``merge`` of the two. Any other aggregator's figures all need
    every value."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = "Cases by state"
    Parameters: ClassVar[type[BaseModel]] = NoParameters
    labels: ClassVar[dict[str, str]] = {}
    incremental: ClassVar[bool] = False

    def __init__(self, parameters: BaseModel) -> None:
        self.parameters = parameters

    @classmethod
    def from_parameters(cls, raw: dict[str, Any] | None) -> Aggregator:
        try:
            return cls(cls.Parameters.model_validate(raw or {}))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'parameters'}: {e['msg']}"
                                 for e in exc.errors()[:5])
            raise AggregatorParameterError(
                f"invalid parameters for aggregator {cls.name!r}: {problems}") from None

    def figures(self, cases: list[CaseView]) -> dict[str, Figure]:
        return {}

    def roc(self, cases: list[CaseView]) -> RocCurve | None:
        return None

    def contribution(self, case: CaseView) -> Sums:
        """What one case adds to its group's running sums (only succeeded cases count)."""
        return {}

    def sum_figures(self, sums: Sums) -> dict[str, Figure]:
        """The figures that follow from a group's running sums alone."""
        return {}

    def full_figures(self, cases: list[CaseView]) -> dict[str, Figure]:
        """The figures that need every value of the group."""
        return self.figures(cases)

    def merge(self, from_sums: dict[str, Figure],
              from_full: dict[str, Figure]) -> dict[str, Figure]:
        """Both kinds of figures in display order."""
        return {**from_sums, **from_full}

    def counts(self, name: str, cases: list[CaseView], pooled: bool) -> GroupReport:
        """A group's cases by state, without figures."""
        states = Counter(c.state for c in cases)
        reasons = Counter(str(c.failure.get("reason", "unknown")) for c in cases
                          if c.state == CaseState.FAILED and c.failure)
        return GroupReport(
            group=name, pooled=pooled, cases=len(cases),
            succeeded=states[CaseState.SUCCEEDED], failed=states[CaseState.FAILED],
            pending=states[CaseState.QUEUED] + states[CaseState.RUNNING],
            failure_reasons=dict(sorted(reasons.items())))

    def group(self, name: str, cases: list[CaseView], pooled: bool) -> GroupReport:
        return self.counts(name, cases, pooled).model_copy(
            update={"figures": self.figures(cases), "roc": self.roc(cases)})

    def columns(self, groups: list[GroupReport]) -> list[Column]:
        keys = list(dict.fromkeys(k for g in groups for k in g.figures))
        return [Column(key=k, label=self.labels.get(k, k)) for k in keys]


AGGREGATORS: dict[str, type[Aggregator]] = {}
A = TypeVar("A", bound=type[Aggregator])


def register(cls: A) -> A:
    """Class decorator: make an aggregator known under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a name to be registered")
    existing = AGGREGATORS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"aggregator name {cls.name!r} is taken by {existing.__qualname__}")
    AGGREGATORS[cls.name] = cls
    return cls


_plugins_loaded = False


def load_plugins() -> None:
    """Import aggregators that other distributions declare in the ``tributary.aggregators``
    entry-point group (importing registers them)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        register(entry.load())


def get_aggregator(name: str, parameters: dict[str, Any] | None = None) -> Aggregator:
    load_plugins()
    try:
        cls = AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; known: {sorted(AGGREGATORS)}") from None
    return cls.from_parameters(parameters)


def lookup(data: dict[str, Any] | None, path: str) -> Any:
    """A value by dotted path (``"prediction.score"``); None when absent."""
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def finite(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else, including integers too large
    for a float (a spoke's output may hold any JSON)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def count(value: int) -> Figure:
    """A count is its own cell: n is the count."""
    return Figure(value=value, n=value)


def proportion(successes: int, n: int, method: str, confidence: float,
               digits: int = 4) -> Figure:
    ci = proportion_ci(successes, n, method, confidence)
    return Figure(value=round(successes / n, digits) if n else None, n=n,
                  ci_low=_round(ci.low, digits), ci_high=_round(ci.high, digits),
                  ci_method=method if n else None, confidence=confidence if n else None)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def number(value: float | None, n: int, digits: int = 4) -> Figure:
    return Figure(value=_round(value, digits), n=n)


"""Exports of an experiment as tables: per-case results (what the spokes released) and
aggregates (already suppressed, straight from a snapshot), as CSV or JSON-ready rows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from tributary.hub.aggregation.report import AggregateRead, ResultRow
from tributary.hub.models import CaseResult, CustodyGap, ExperimentTarget, GapState

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def flatten(data: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """Nested objects to dotted keys; lists stay whole (one cell)."""
    flat: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


#: Rows read from the database per round trip while an export streams.
CHUNK = 500
_RESULT_FIELDS = (CaseResult.spoke_id, CaseResult.case_id, CaseResult.state,
                  CaseResult.attempt, CaseResult.failure, CaseResult.finished_at,
                  CaseResult.output, CaseResult.released)


def iter_result_rows(engine: Engine, experiment_id: str) -> Iterator[ResultRow]:
    """Every case as a :class:`ResultRow`, in (spoke, case) order, read in chunks of
    ``CHUNK`` (keyset, own session: usable while a response streams) without custody."""
    after: tuple[str, str] | None = None
    while True:
        with Session(engine) as session:
            query = select(*_RESULT_FIELDS).where(CaseResult.experiment_id == experiment_id)
            if after is not None:
                query = query.where(or_(col(CaseResult.spoke_id) > after[0],
                                        (col(CaseResult.spoke_id) == after[0])
                                        & (col(CaseResult.case_id) > after[1])))
            rows = session.exec(query.order_by(CaseResult.spoke_id, CaseResult.case_id)
                                .limit(CHUNK)).all()
        for spoke_id, case_id, state, attempt, failure, finished_at, output, released in rows:
            yield ResultRow(spoke_id=spoke_id, case_id=case_id,
                            state=getattr(state, "value", state), attempt=attempt,
                            failure_reason=(failure or {}).get("reason") if failure else None,
                            failure=failure or None, finished_at=finished_at,
                            output=flatten(output),
                            released=flatten(released))
        if len(rows) < CHUNK:
            return
        after = (rows[-1][0], rows[-1][1])


#: Whole case rows (with custody records, a few kilobytes each) per round trip.
BUNDLE_CHUNK = 100


def iter_bundle_cases(engine: Engine, experiment_id: str,
                      counted: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """Every case of an experiment whole (custody record included), as the study bundle
    writes it, in (spoke, case) order, read ``BUNDLE_CHUNK`` rows at a time in sessions of
    its own: a bundle of 30,000 results never holds more than one chunk. ``counted``, if
    given, gets the number of results with a custody record appended at the end."""
    after: tuple[str, str] | None = None
    with_custody = 0
    while True:
        with Session(engine) as session:
            query = select(CaseResult).where(CaseResult.experiment_id == experiment_id)
            if after is not None:
                query = query.where(or_(col(CaseResult.spoke_id) > after[0],
                                        (col(CaseResult.spoke_id) == after[0])
                                        & (col(CaseResult.case_id) > after[1])))
            rows = session.exec(query.order_by(CaseResult.spoke_id, CaseResult.case_id)
                                .limit(BUNDLE_CHUNK)).all()
            chunk = [{**row.model_dump(mode="json"), "state": row.state.value} for row in rows]
        for case in chunk:
            with_custody += bool(case.get("custody"))
            yield case
        if len(chunk) < BUNDLE_CHUNK:
            if counted is not None:
                counted.append(with_custody)
            return
        after = (chunk[-1]["spoke_id"], chunk[-1]["case_id"])


def stream_results_json(engine: Engine, experiment_id: str) -> Iterator[str]:
    """The JSON array of :func:`iter_result_rows`, one row at a time."""
    yield "["
    for i, row in enumerate(iter_result_rows(engine, experiment_id)):
        yield ("," if i else "") + row.model_dump_json()
    yield "]\n"


def stream_results_csv(engine: Engine, experiment_id: str) -> Iterator[str]:
    """The CSV of :func:`results_csv`, streamed: a first pass collects the output and
    released columns (the header needs them), a second writes the rows in chunks."""
    outputs: set[str] = set()
    released: set[str] = set()
    for row in iter_result_rows(engine, experiment_id):
        outputs.update(row.output)
        released.update(row.released)
    out_keys, rel_keys = sorted(outputs), sorted(released)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*RESULT_COLUMNS, *(f"output.{k}" for k in out_keys),
                     *(f"released.{k}" for k in rel_keys)])
    for i, r in enumerate(iter_result_rows(engine, experiment_id), 1):
        writer.writerow([_cell(v) for v in (
            r.spoke_id, r.case_id, r.state, r.attempt, r.failure_reason,
            r.finished_at.isoformat() if r.finished_at else None, *failure_cells(r.failure),
            *(r.output.get(k) for k in out_keys), *(r.released.get(k) for k in rel_keys))])
        if i % CHUNK == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def result_rows(session: Session, experiment_id: str) -> list[ResultRow]:
    rows = session.exec(select(CaseResult).where(CaseResult.experiment_id == experiment_id)
                        .order_by(CaseResult.spoke_id, CaseResult.case_id)).all()
    return [ResultRow(spoke_id=r.spoke_id, case_id=r.case_id, state=r.state.value,
                      attempt=r.attempt,
                      failure_reason=(r.failure or {}).get("reason") if r.failure else None,
                      failure=r.failure or None, finished_at=r.finished_at,
                      output=flatten(r.output),
                      released=flatten(r.released)) for r in rows]


def _cell(value: Any) -> Any:
    """One CSV cell: structures as JSON; text that a spreadsheet would run as a formula is
    quoted with a leading apostrophe (OWASP CSV injection)."""
    if value is None:
        return ""
    if isinstance(value, list | dict):
        value = json.dumps(value, sort_keys=True)
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def to_csv(header: list[str], rows: Iterable[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return buffer.getvalue()


RESULT_COLUMNS = ["spoke_id", "case_id", "state", "attempt", "failure_reason", "finished_at",
                  "failure_exit_code", "failure_detail", "failure_applied_limits",
                  "failure_discarded_files", "failure_log_tail"]
#: What the log tail cell says when the site's policy withheld it.
LOG_WITHHELD = "(withheld by the site's policy)"


def failure_cells(failure: dict[str, Any] | None) -> list[Any]:
    """A failed case's diagnostics as CSV cells: exit code, detail, the limits it ran under
    (after the site's caps), the discarded files (names and sizes), the log tail or that
    the site withheld it."""
    if not failure:
        return [None] * 5
    limits = {k: v for k, v in (failure.get("applied_limits") or {}).items() if v is not None}
    files = failure.get("discarded_files") or []
    return [failure.get("exit_code"), failure.get("detail"),
            "; ".join(f"{k}={v}" for k, v in sorted(limits.items())) or None,
            "; ".join(f"{f.get('name')} ({f.get('size_bytes')} B)" for f in files) or None,
            LOG_WITHHELD if failure.get("log_withheld") else failure.get("log_tail")]


def results_csv(rows: list[ResultRow]) -> str:
    outputs = sorted({k for r in rows for k in r.output})
    released = sorted({k for r in rows for k in r.released})
    header = [*RESULT_COLUMNS, *(f"output.{k}" for k in outputs),
              *(f"released.{k}" for k in released)]
    return to_csv(header, (
        [r.spoke_id, r.case_id, r.state, r.attempt, r.failure_reason,
         r.finished_at.isoformat() if r.finished_at else None, *failure_cells(r.failure),
         *(r.output.get(k) for k in outputs), *(r.released.get(k) for k in released)]
        for r in rows))


#: ``as_of`` and ``results_covered`` say how fresh each figure is: between full passes the
#: figures that need every value (AUC, quantiles, bootstrap intervals) are those of the last
#: full pass, older than the snapshot's counts (``AggregateRead.full_pass``).
AGGREGATE_COLUMNS = ["group", "figure", "value", "n", "ci_low", "ci_high", "ci_method",
                     "confidence", "suppressed", "as_of", "results_covered"]


def aggregate_csv(report: AggregateRead) -> str:
    """Long format, one figure per row: the state counts first, then every figure, each
    with the time and the number of results it is computed from."""
    current = (report.computed_at.isoformat(), report.results)
    full = report.full_pass
    older = set(full.figures) if full is not None else set()
    past = (full.computed_at.isoformat(), full.results) if full is not None else current

    def rows() -> Iterable[list[Any]]:
        for name, group in report.groups.items():
            for key in ("cases", "succeeded", "failed", "pending"):
                yield [name, key, getattr(group, key), getattr(group, key), None, None, None,
                       None, None, *current]
            for key, f in group.figures.items():
                yield [name, key, f.value, f.n, f.ci_low, f.ci_high, f.ci_method,
                       f.confidence, f.suppressed, *(past if key in older else current)]
    return to_csv(AGGREGATE_COLUMNS, rows())


def roc_csv(report: AggregateRead) -> str:
    """ROC points per group; a suppressed group is one row saying so."""
    def rows() -> Iterable[list[Any]]:
        for name, group in report.groups.items():
            if group.roc is None:
                continue
            if group.roc.suppressed:
                yield [name, None, None, None, group.roc.suppressed]
            for p in group.roc.points:
                yield [name, p.threshold, p.fpr, p.tpr, None]
    return to_csv(["group", "threshold", "fpr", "tpr", "suppressed"], rows())


def custody_gaps(session: Session, experiment_id: str) -> list[dict[str, Any]]:
    """Custody gaps an administrator accepted at the experiment's spokes, for the study's
    exports and bundle: which records of which spoke's chain were accepted as lost, by
    whom, why, and which of this experiment's cases have no result because of it."""
    spokes = [t.spoke_id for t in session.exec(select(ExperimentTarget).where(
        ExperimentTarget.experiment_id == experiment_id)).all()]
    gaps = session.exec(select(CustodyGap).where(
        CustodyGap.spoke_id.in_(spokes),  # type: ignore[attr-defined]
        CustodyGap.state == GapState.ACCEPTED.value).order_by(CustodyGap.id)).all()
    return [{"spoke_id": g.spoke_id, "first_missing": g.first_missing,
             "last_missing": g.last_missing, "state": g.state,
             "accepted_by": g.accepted_by, "reason": g.accepted_reason,
             "accepted_at": g.settled_at.isoformat() if g.settled_at else None,
             "lost_cases": sorted(session.exec(select(CaseResult.case_id).where(
                 CaseResult.experiment_id == experiment_id,
                 CaseResult.spoke_id == g.spoke_id,
                 CaseResult.note.like(f"lost in transit (custody gap {g.id} %")  # type: ignore[union-attr]
             )).all())} for g in gaps]

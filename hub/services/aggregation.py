"""Aggregators turn per-case results into the figures a coordinator reads, per spoke and
pooled. They are plain classes registered by name; an experiment names the one it uses."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlmodel import Session, select

from tributary.hub.models import CaseResult, CaseState, Experiment, ExperimentTarget

POOLED = "pooled"


@dataclass(frozen=True)
class CaseView:
    spoke_id: str
    case_id: str
    state: CaseState
    output: dict[str, Any] | None
    released: dict[str, Any]
    failure: dict[str, Any] | None


@dataclass
class Report:
    aggregator: str
    columns: list[tuple[str, str]]
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"aggregator": self.aggregator,
                "columns": [{"key": k, "label": label} for k, label in self.columns],
                "groups": self.groups}


class Aggregator:
    """Counts cases by state; subclasses add algorithm-specific figures."""

    name: ClassVar[str] = "summary"
    columns: ClassVar[list[tuple[str, str]]] = [
        ("cases", "Cases"), ("succeeded", "Done"), ("failed", "Failed"),
        ("pending", "Pending"),
    ]

    def figures(self, cases: list[CaseView]) -> dict[str, Any]:
        states = Counter(c.state for c in cases)
        reasons = Counter(c.failure.get("reason", "unknown") for c in cases
                          if c.state == CaseState.FAILED and c.failure)
        return {
            "cases": len(cases),
            "succeeded": states[CaseState.SUCCEEDED],
            "failed": states[CaseState.FAILED],
            "pending": states[CaseState.QUEUED] + states[CaseState.RUNNING],
            "failure_reasons": dict(reasons),
        }


def _distance(a: list[float], b: list[float]) -> float:
    return math.dist(a, b)


def match_findings(findings: list[dict[str, Any]], truth: list[dict[str, Any]],
                   min_tolerance_mm: float = 3.0) -> tuple[list[tuple[dict, dict]], int, int]:
    """Greedy nearest matching of detections to ground-truth nodules. A detection matches
    a nodule whose centre lies within the nodule's radius (at least ``min_tolerance_mm``).
    Returns (matched pairs, false negatives, false positives)."""
    candidates = sorted(
        ((_distance(f["center_mm"], t["center_mm"]), i, j)
         for i, f in enumerate(findings) for j, t in enumerate(truth)),
    )
    used_f: set[int] = set()
    used_t: set[int] = set()
    pairs = []
    for dist, i, j in candidates:
        if i in used_f or j in used_t:
            continue
        if dist <= max(truth[j]["diameter_mm"] / 2, min_tolerance_mm):
            used_f.add(i)
            used_t.add(j)
            pairs.append((findings[i], truth[j]))
    return pairs, len(truth) - len(used_t), len(findings) - len(used_f)


class NoduleDetectionAggregator(Aggregator):
    """Findings per case, and detection sensitivity where the spoke released the
    ground-truth nodules (``released["nodules"]``)."""

    name: ClassVar[str] = "nodule-detection"
    columns: ClassVar[list[tuple[str, str]]] = [
        *Aggregator.columns,
        ("findings", "Findings"), ("findings_per_case", "Findings/case"),
        ("truth_nodules", "GT nodules"), ("sensitivity", "Sensitivity"),
        ("false_positives_per_case", "FP/case"), ("diameter_error_mm", "Diam. err (mm)"),
    ]

    def figures(self, cases: list[CaseView]) -> dict[str, Any]:
        figures = super().figures(cases)
        done = [c for c in cases if c.state == CaseState.SUCCEEDED and c.output]
        counts = [len(c.output.get("findings", [])) for c in done if c.output]
        figures["findings"] = sum(counts)
        figures["findings_per_case"] = round(sum(counts) / len(counts), 3) if counts else None
        with_truth = [c for c in done if isinstance(c.released.get("nodules"), list)]
        tp = fn = fp = 0
        errors: list[float] = []
        for case in with_truth:
            assert case.output is not None
            pairs, misses, extras = match_findings(case.output.get("findings", []),
                                                   case.released["nodules"])
            tp += len(pairs)
            fn += misses
            fp += extras
            errors += [abs(f["diameter_mm"] - t["diameter_mm"]) for f, t in pairs]
        figures.update({
            "truth_cases": len(with_truth),
            "truth_nodules": tp + fn,
            "true_positives": tp,
            "false_negatives": fn,
            "false_positives": fp,
            "sensitivity": round(tp / (tp + fn), 4) if tp + fn else None,
            "false_positives_per_case": round(fp / len(with_truth), 3) if with_truth else None,
            "diameter_error_mm": round(sum(errors) / len(errors), 2) if errors else None,
        })
        return figures


AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (Aggregator, NoduleDetectionAggregator)
}


def get_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]()
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; known: {sorted(AGGREGATORS)}") from None


def aggregate(session: Session, experiment: Experiment) -> Report:
    aggregator = get_aggregator(experiment.aggregator)
    rows = session.exec(select(CaseResult).where(CaseResult.experiment_id == experiment.id)).all()
    views = [CaseView(r.spoke_id, r.case_id, r.state, r.output, r.released or {}, r.failure)
             for r in rows]
    spokes = [t.spoke_id for t in session.exec(
        select(ExperimentTarget).where(ExperimentTarget.experiment_id == experiment.id)
        .order_by(ExperimentTarget.spoke_id))]
    report = Report(aggregator.name, list(aggregator.columns))
    for spoke in spokes:
        report.groups[spoke] = aggregator.figures([v for v in views if v.spoke_id == spoke])
    report.groups[POOLED] = aggregator.figures(views)
    return report

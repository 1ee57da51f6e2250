"""The dashboard's figures: valid SVG drawn from plain data, and suppressed figures of the
aggregate report never plotted."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime

from tributary.hub.aggregation.report import (
    AggregateRead,
    Column,
    Figure,
    GroupReport,
    RocCurve,
    RocPoint,
)
from tributary.hub.schemas import CaseRead, ExperimentRead, TargetProgress
from tributary.hub.services import plots
from tributary.hub.web.results import results_view

SVG = "{http://www.w3.org/2000/svg}"


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert root.find(f"{SVG}title") is not None
    return root


def _texts(svg: str) -> str:
    return " ".join(t.text or "" for t in _parse(svg).iter(f"{SVG}text"))


def test_each_plot_is_standalone_svg_with_its_labels() -> None:
    bars = plots.progress_bars([plots.SpokeProgress("north", 3, 1, 1, 2, 7),
                                plots.SpokeProgress("south", 0, 0, 0, 0, None)])
    assert "north" in _texts(bars) and "4/7" in _texts(bars) and "0/?" in _texts(bars)
    roc = plots.roc_curves({"north": [(0, 0), (0.5, 1), (1, 1)]}, {"north": 0.75})
    assert "north (AUC 0.75)" in _texts(roc)
    forest = plots.forest([plots.Estimate("north", 0.8, 0.6, 0.9, 10),
                           plots.Estimate("pooled", 0.7, 0.6, 0.8, 20)], "sensitivity")
    assert "0.80 [0.60, 0.90], n=10" in _texts(forest)
    assert "sensitivity (95% confidence interval)" in _texts(forest)
    at_90 = plots.forest([plots.Estimate("north", 0.8, 0.65, 0.88, 10)], "sensitivity",
                         confidence=0.9)
    assert "sensitivity (90% confidence interval)" in _texts(at_90)
    assert "nodule_count" in _texts(plots.distribution({"north": [1, 2]}, "nodule_count"))


def _case(spoke: str, n: int, count: int) -> CaseRead:
    return CaseRead(spoke_id=spoke, case_id=f"c-{spoke}-{n}", state="succeeded", attempt=1,
                    output={"nodule_count": count}, failure=None, released={},
                    image_digest=None, started_at=None, finished_at=None)


def _group(name: str, cases: int, sensitivity: Figure, roc: RocCurve | None) -> GroupReport:
    return GroupReport(group=name, pooled=name == "pooled", cases=cases, succeeded=cases,
                       failed=0, pending=0, figures={"sensitivity": sensitivity}, roc=roc)


def test_suppressed_figures_are_never_plotted() -> None:
    now = datetime.now(UTC)
    targets = [TargetProgress(spoke_id=s, state="completed", reason=None, case_count=n,
                              queued=0, running=0, succeeded=n, failed=0)
               for s, n in (("big", 6), ("tiny", 2))]
    experiment = ExperimentRead(
        id="exp-1", name="x", state="completed", algorithm_id=1, algorithm="a 1", image="i",
        arguments={}, cohort={}, limits={}, release=[], aggregator="binary-classification",
        aggregator_parameters={}, created_at=now, launched_at=now, completed_at=now,
        expires_at=None, targets=targets)
    cases = [_case("big", i, i % 3) for i in range(6)] + [_case("tiny", i, 9) for i in range(2)]
    curve = RocCurve(positives=3, negatives=3, points=[
        RocPoint(threshold=None, fpr=0, tpr=0), RocPoint(threshold=1, fpr=0.33, tpr=1),
        RocPoint(threshold=0, fpr=1, tpr=1)])
    hidden = Figure(value=None, n=2, suppressed="fewer than 5 cases")
    report = AggregateRead(
        experiment_id="exp-1", aggregator="binary-classification", parameters={}, version=3,
        computed_at=now, results=8, min_cell_size=5,
        columns=[Column(key="sensitivity", label="Sensitivity")],
        groups={"big": _group("big", 6, Figure(value=0.8, n=6, ci_low=0.4, ci_high=0.96,
                                               ci_method="wilson", confidence=0.95), curve),
                "tiny": _group("tiny", 2, hidden, RocCurve(positives=None, negatives=None,
                                                            suppressed="fewer than 5 cases")),
                "pooled": _group("pooled", 8, Figure(value=0.75, n=8, ci_low=0.4, ci_high=0.9,
                                                     ci_method="wilson", confidence=0.95),
                                 curve)})
    view = results_view(experiment, report, cases)
    assert set(view.figures) == {"Progress per spoke", "Distribution of nodule_count",
                                 "ROC curves", "Sensitivity per spoke"}
    for title, svg in view.figures.items():
        if title != "Progress per spoke":  # progress is public: counts of cases only
            assert "tiny" not in _texts(svg), title
    assert "0.80 [0.40, 0.96], n=6" in _texts(view.figures["Sensitivity per spoke"])
    assert "pooled" in _texts(view.figures["ROC curves"])
    tiny = dict(view.rows)["tiny"]
    assert tiny[-1].suppressed == "fewer than 5 cases" and tiny[-1].text == "suppressed"
    assert dict(view.rows)["big"][-1].interval == "[0.4, 0.96]"
    assert view.intervals == "95% wilson"


def test_titles_are_escaped() -> None:
    svg = plots.distribution({"north": [1.0]}, 'x" onload="alert(1)')
    root = _parse(svg)
    assert root.get("aria-label") == 'Distribution of x" onload="alert(1) per spoke'
    assert root.get("onload") is None


def test_roc_curves_for_more_spokes_than_colours() -> None:
    """A study of two hundred hospitals draws, rather than failing with StopIteration."""
    from tributary.hub.services.plots import roc_curves

    curves = {f"site-{i:03d}": [(0.0, 0.0), (0.2, 0.7), (1.0, 1.0)] for i in range(200)}
    svg = roc_curves({**curves, "pooled": [(0.0, 0.0), (0.3, 0.8), (1.0, 1.0)]})
    assert svg.count("site-199") >= 1

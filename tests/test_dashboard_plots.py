"""The dashboard's figures: valid SVG drawn from plain data, suppressed groups never plotted,
and the interval and ROC arithmetic they show."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from tributary.hub.api.schemas import CaseRead, ExperimentRead, TargetProgress
from tributary.hub.services import plots
from tributary.hub.web.results import auc, results_view, roc_points, wilson

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
    assert "nodule_count" in _texts(plots.distribution({"north": [1, 2]}, "nodule_count"))


def test_wilson_interval_matches_the_textbook_values() -> None:
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0


def test_roc_points_sweep_every_threshold() -> None:
    scored = [(0.9, True), (0.8, False), (0.7, True), (0.1, False)]
    points = roc_points(scored)
    assert points == [(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
    assert auc(points) == pytest.approx(0.75)
    assert roc_points([(1.0, True)]) == []  # no negatives: no curve


def _case(spoke: str, n: int, count: int, nodules: int) -> CaseRead:
    findings = [{"diameter_mm": 5.0 + i} for i in range(count)]
    return CaseRead(spoke_id=spoke, case_id=f"c-{spoke}-{n}", state="succeeded", attempt=1,
                    output={"nodule_count": count, "findings": findings}, failure=None,
                    released={"nodules": [{}] * nodules}, image_digest=None, started_at=None,
                    finished_at=None)


def test_suppressed_groups_are_never_plotted() -> None:
    now = datetime.now(UTC)
    targets = [TargetProgress(spoke_id=s, state="completed", reason=None, case_count=n,
                              queued=0, running=0, succeeded=n, failed=0)
               for s, n in (("big", 4), ("tiny", 2))]
    experiment = ExperimentRead(
        id="exp-1", name="x", state="completed", algorithm_id=1, algorithm="a 1", image="i",
        arguments={}, cohort={}, limits={}, release=[], aggregator="nodule-detection",
        created_at=now, launched_at=now, completed_at=now, expires_at=None, targets=targets)
    cases = [_case("big", i, i % 2 + i // 2, i % 2) for i in range(4)]
    cases += [_case("tiny", i, 7, 1) for i in range(2)]
    report = {"columns": [{"key": "cases", "label": "Cases"}], "groups": {
        "big": {"cases": 4, "true_positives": 2, "false_negatives": 0},
        "tiny": {"suppressed": True},
        "pooled": {"cases": 6, "true_positives": 3, "false_negatives": 1}}}
    view = results_view(experiment, report, cases)
    assert view.suppressed == ["tiny"]
    assert set(view.figures) == {"Progress per spoke", "Distribution of nodule_count",
                                 "ROC curves", "Sensitivity per spoke"}
    for title, svg in view.figures.items():
        if title != "Progress per spoke":  # progress is public: counts of cases only
            assert "tiny" not in _texts(svg), title
    forest = _texts(view.figures["Sensitivity per spoke"])
    assert "big" in forest and "pooled" in forest
    low, high = wilson(3, 4)
    assert f"0.75 [{low:.2f}, {high:.2f}], n=4" in forest
    assert not math.isnan(low)

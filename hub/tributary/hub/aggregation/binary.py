"""Binary classification against a label the spoke released: sensitivity and specificity
with binomial intervals, AUC with its DeLong interval, and the ROC curve for plots."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from tributary.hub.aggregation.base import (
    Aggregator,
    CaseView,
    count,
    finite,
    lookup,
    proportion,
    register,
)
from tributary.hub.aggregation.partial import Sums, total
from tributary.hub.aggregation.report import Figure, RocCurve, RocPoint
from tributary.hub.aggregation.statistics import auc_delong, roc_curve
from tributary.hub.models import CaseState


class BinaryParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score: str = Field("score", description="Dotted output field holding the score "
                                            "(higher means more likely positive).")
    label: str = Field("label", description="Released attribute holding the true class.")
    positive: Any = Field(1, description="Label value of the positive class (true == 1).")
    prediction: str | None = Field(
        None, description="Dotted output field with the algorithm's own yes/no call; when "
                          "absent a case is called positive if score >= threshold.")
    threshold: float = Field(0.5, description="Operating point for sensitivity/specificity.")
    ci_method: Literal["wilson", "clopper-pearson"] = "wilson"
    confidence: float = Field(0.95, gt=0, lt=1)


def _number(value: Any) -> float | None:
    return finite(value)


def _truthy(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str) and value.lower() in ("true", "yes", "positive", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "negative", "0"):
        return False
    return None


@register
class BinaryClassificationAggregator(Aggregator):
    name: ClassVar[str] = "binary-classification"
    description: ClassVar[str] = ("Sensitivity, specificity, AUC and ROC of a score against "
                                  "a released label")
    Parameters = BinaryParameters
    labels: ClassVar[dict[str, str]] = {
        "labelled": "Labelled", "unusable": "No score/label", "positives": "Positives",
        "negatives": "Negatives", "true_positives": "TP", "false_negatives": "FN",
        "true_negatives": "TN", "false_positives": "FP", "sensitivity": "Sensitivity",
        "specificity": "Specificity", "auc": "AUC",
    }

    incremental: ClassVar[bool] = True

    def _case(self, case: CaseView) -> tuple[float, bool, bool] | None:
        """(score, truth, called positive) of a usable succeeded case, else None."""
        p: BinaryParameters = self.parameters  # type: ignore[assignment]
        score = _number(lookup(case.output, p.score))
        label = lookup(case.released, p.label)
        called = score is not None and score >= p.threshold
        if p.prediction is not None:
            call = _truthy(lookup(case.output, p.prediction))
            called = bool(call)
            if call is None:
                score = None
        if score is None or label is None:
            return None
        return score, label == p.positive, called

    def _cases(self, cases: list[CaseView]) -> tuple[list[tuple[float, bool, bool]], int]:
        """(score, truth, called positive) of every usable case, and how many were not."""
        usable: list[tuple[float, bool, bool]] = []
        unusable = 0
        for case in cases:
            if case.state != CaseState.SUCCEEDED:
                continue
            found = self._case(case)
            if found is None:
                unusable += 1
            else:
                usable.append(found)
        return usable, unusable

    def contribution(self, case: CaseView) -> Sums:
        if case.state != CaseState.SUCCEEDED:
            return {}
        found = self._case(case)
        if found is None:
            return {"unusable": 1}
        _, truth, called = found
        return {("tp" if called else "fn") if truth else ("fp" if called else "tn"): 1}

    def sum_figures(self, sums: Sums) -> dict[str, Figure]:
        p: BinaryParameters = self.parameters  # type: ignore[assignment]
        tp, fn, tn, fp = (sums.get(k, 0) for k in ("tp", "fn", "tn", "fp"))
        positives, negatives = tp + fn, tn + fp
        return {
            "labelled": count(positives + negatives), "unusable": count(sums.get("unusable", 0)),
            "positives": count(positives), "negatives": count(negatives),
            "true_positives": count(tp), "false_negatives": count(fn),
            "true_negatives": count(tn), "false_positives": count(fp),
            "sensitivity": proportion(tp, positives, p.ci_method, p.confidence),
            "specificity": proportion(tn, negatives, p.ci_method, p.confidence),
        }

    def full_figures(self, cases: list[CaseView]) -> dict[str, Figure]:
        p: BinaryParameters = self.parameters  # type: ignore[assignment]
        usable, _ = self._cases(cases)
        positives = sum(1 for _, truth, _ in usable if truth)
        smaller_class = min(positives, len(usable) - positives)
        if not smaller_class:
            return {"auc": Figure(value=None, n=0)}
        estimate = auc_delong([s for s, _, _ in usable], [t for _, t, _ in usable],
                              p.confidence)
        return {"auc": Figure(
            value=round(estimate.auc, 4), n=smaller_class,
            ci_low=None if estimate.low is None else round(estimate.low, 4),
            ci_high=None if estimate.high is None else round(estimate.high, 4),
            ci_method="delong" if estimate.low is not None else None,
            confidence=p.confidence if estimate.low is not None else None)}

    def figures(self, cases: list[CaseView]) -> dict[str, Figure]:
        return self.merge(self.sum_figures(total(self.contribution(c) for c in cases)),
                          self.full_figures(cases))

    def roc(self, cases: list[CaseView]) -> RocCurve:
        usable, _ = self._cases(cases)
        positives = sum(1 for _, truth, _ in usable if truth)
        negatives = len(usable) - positives
        points: list[RocPoint] = []
        if positives and negatives:
            points = [RocPoint(threshold=t, fpr=f, tpr=r)
                      for t, f, r in roc_curve([s for s, _, _ in usable],
                                               [t for _, t, _ in usable])]
        return RocCurve(positives=positives, negatives=negatives, points=points)

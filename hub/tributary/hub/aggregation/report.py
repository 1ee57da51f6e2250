"""The shape of an aggregate: what aggregators produce, what snapshots store and what the
API, pages and exports read. Every number carries ``n``, the cases it was computed over, so
small-cell suppression can be decided (and checked) figure by figure."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

POOLED = "pooled"


class Figure(BaseModel):
    """One number of one group (a spoke, or all spokes pooled)."""

    value: float | int | None = Field(
        description="The figure; null when there is no data or when it is suppressed.")
    n: int | None = Field(description="Cases the figure is computed over; decides "
                                      "suppression (a proportion's denominator, a count "
                                      "itself, the smaller class for an AUC). Null when the "
                                      "figure is suppressed.")
    ci_low: float | None = Field(None, description="Lower confidence limit.")
    ci_high: float | None = Field(None, description="Upper confidence limit.")
    ci_method: str | None = Field(None, description="How the interval was computed, e.g. "
                                                    "'wilson', 'clopper-pearson', 'delong'.")
    confidence: float | None = Field(None, description="Confidence level of the interval.")
    suppressed: str | None = Field(None, description="Why the value is withheld, e.g. "
                                                     "'fewer than 5 cases'; null if shown.")


class RocPoint(BaseModel):
    threshold: float | None = Field(description="Score at or above which a case is called "
                                                "positive; null for the (0, 0) start point.")
    fpr: float = Field(description="False-positive rate, 1 - specificity.")
    tpr: float = Field(description="True-positive rate, sensitivity.")


class RocCurve(BaseModel):
    """Empirical ROC curve of one group, for plots."""

    positives: int | None = Field(description="Labelled positives (null when suppressed).")
    negatives: int | None = Field(description="Labelled negatives (null when suppressed).")
    points: list[RocPoint] = Field(default_factory=list,
                                   description="From (0, 0) to (1, 1); empty if suppressed.")
    suppressed: str | None = None


class GroupReport(BaseModel):
    """Figures of one spoke, or of all spokes pooled. The case counts by state are the
    progress every coordinator already sees per spoke, so they are never suppressed."""

    group: str = Field(description="Spoke id, or 'pooled'.")
    pooled: bool
    cases: int
    succeeded: int
    failed: int
    pending: int
    failure_reasons: dict[str, int] = Field(default_factory=dict)
    figures: dict[str, Figure] = Field(default_factory=dict)
    roc: RocCurve | None = Field(None, description="Only for aggregators that rank scores.")


class Column(BaseModel):
    key: str = Field(description="Key in each group's ``figures``.")
    label: str = Field(description="Human-readable heading.")


class FullPass(BaseModel):
    """The figures of a snapshot that need every value (AUC, ROC curves, quantiles, bootstrap
    intervals) come from the last full pass over the results, made at most every few tens
    of seconds while results arrive; the other figures (counts, proportions, means) follow
    running sums and are as of the snapshot itself."""

    computed_at: datetime = Field(description="When the full pass read the results.")
    results: int = Field(description="Final results the full pass covered.")
    figures: list[str] = Field(default_factory=list,
                               description="Figure keys taken from the full pass; ROC "
                                           "curves always are.")


class AggregateRead(BaseModel):
    """The latest (or a requested) aggregate snapshot of an experiment."""

    experiment_id: str
    aggregator: str
    parameters: dict[str, Any] = Field(description="The aggregator parameters in force.")
    version: int = Field(description="Snapshot version, 1, 2, … per experiment; a new one "
                                     "whenever the results aggregated change.")
    computed_at: datetime
    results: int = Field(description="Final results (succeeded or failed) aggregated.")
    min_cell_size: int = Field(description="k: figures over fewer cases are suppressed.")
    current: bool = Field(True, description="False when results arrived after this snapshot "
                                            "and a newer one is being computed.")
    received: int | None = Field(None, description="Final results received so far (the "
                                 "snapshot covers `results` of them); None for old versions.")
    full_pass: FullPass | None = Field(None, description=(
        "Where some figures are older than the snapshot: the full pass they come from. "
        "Null when every figure is as of ``computed_at``."))
    columns: list[Column] = Field(description="Figure keys in display order.")
    groups: dict[str, GroupReport] = Field(
        description="Per spoke (sorted by id), then 'pooled' last.")


class SnapshotInfo(BaseModel):
    version: int
    computed_at: datetime
    results: int
    min_cell_size: int


class ResultRow(BaseModel):
    """One case as the coordinator may see it: outputs and attributes the spoke released."""

    spoke_id: str
    case_id: str = Field(description="The spoke's pseudonym for the case.")
    state: str
    attempt: int
    failure_reason: str | None = None
    failure: dict[str, Any] | None = Field(None, description=(
        "A failed case's failure as its spoke released it: detail, exit code, log tail (or "
        "log_withheld), applied_limits and discarded_files."))
    finished_at: datetime | None = None
    output: dict[str, Any] = Field(default_factory=dict,
                                   description="output.json flattened to dotted keys.")
    released: dict[str, Any] = Field(default_factory=dict,
                                     description="Released attributes, flattened.")

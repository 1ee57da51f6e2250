"""Small-cell suppression: a figure computed over fewer than k cases is withheld (value and
interval null, ``suppressed`` says why), and so is the ROC curve of a group whose smaller
class has fewer than k cases. Applied once, before a snapshot is stored, so no page, API
response or export can show what was computed but withheld."""

from __future__ import annotations

from tributary.hub.aggregation.report import Figure, GroupReport, RocCurve


def reason(k: int) -> str:
    return f"fewer than {k} cases"


def suppress_figure(figure: Figure, k: int) -> Figure:
    if figure.n == 0 or figure.n >= k:
        return figure  # nothing computed (no data), or enough cases
    return Figure(value=None, n=figure.n, suppressed=reason(k))


def suppress_roc(roc: RocCurve, k: int) -> RocCurve:
    smaller = min(roc.positives or 0, roc.negatives or 0)
    if smaller >= k:
        return roc
    return RocCurve(positives=None, negatives=None, points=[], suppressed=reason(k))


def suppress_group(group: GroupReport, k: int) -> GroupReport:
    return group.model_copy(update={
        "figures": {key: suppress_figure(f, k) for key, f in group.figures.items()},
        "roc": None if group.roc is None else suppress_roc(group.roc, k),
    })

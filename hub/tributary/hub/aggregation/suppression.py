"""Small-cell suppression of one aggregate table (the spoke groups and the pooled group).

1. Primary: a figure computed over fewer than k cases is withheld (value and interval null,
   ``suppressed`` says why), and so is the ROC curve of a group whose smaller class has
   fewer than k cases.
2. Complementary: pooled minus the other groups would give a withheld figure back, so per
   figure, while the withheld spoke groups are one alone or together cover fewer than k
   cases, the shown spoke group with the fewest cases is withheld too, and when none is
   left, the pooled figure.
3. A withheld figure's n is hidden as well: for a count n is the value itself, and shown
   n's would let the withheld n be subtracted out.

Applied before a snapshot is stored (and again when one is read), so no page, API response,
export or plot can show what was computed but withheld."""

from __future__ import annotations

from tributary.hub.aggregation.report import Figure, GroupReport, RocCurve


def reason(k: int) -> str:
    return f"fewer than {k} cases"


def complement_reason() -> str:
    return "withheld so that a suppressed figure cannot be recovered by subtraction"


def suppress_figure(figure: Figure, k: int) -> Figure:
    if figure.suppressed or figure.n is None or figure.n == 0 or figure.n >= k:
        return figure  # already withheld, nothing computed (no data), or enough cases
    return Figure(value=None, n=figure.n, suppressed=reason(k))


def suppress_roc(roc: RocCurve, k: int) -> RocCurve:
    if roc.suppressed:
        return roc
    smaller = min(roc.positives or 0, roc.negatives or 0)
    if smaller >= k:
        return roc
    return RocCurve(positives=None, negatives=None, points=[], suppressed=reason(k))


def suppress_group(group: GroupReport, k: int) -> GroupReport:
    return group.model_copy(update={
        "figures": {key: suppress_figure(f, k) for key, f in group.figures.items()},
        "roc": None if group.roc is None else suppress_roc(group.roc, k),
    })


def _complement(figures: dict[str, Figure], pooled: str, k: int) -> dict[str, Figure]:
    """One figure across the groups (group name -> figure): withhold more until no withheld
    value can be recovered from the pooled figure and the shown ones."""
    if pooled not in figures or figures[pooled].suppressed:
        return figures  # no total to subtract from
    spokes = {name: f for name, f in figures.items() if name != pooled}
    withheld = [f for f in spokes.values() if f.suppressed]
    if not withheld or any(f.n is None for f in withheld):
        return figures  # nothing withheld, or complemented already (n's hidden)
    hidden = sum(f.n or 0 for f in withheld)
    shown = sorted((name for name, f in spokes.items() if not f.suppressed and f.n),
                   key=lambda name: (spokes[name].n or 0, name))
    result = dict(figures)
    count = len(withheld)
    while count == 1 or hidden < k:
        victim = shown.pop(0) if shown else pooled
        result[victim] = Figure(value=None, n=figures[victim].n, suppressed=complement_reason())
        if victim == pooled:
            break
        hidden += figures[victim].n or 0
        count += 1
    return result


def _hide_n(figure: Figure) -> Figure:
    return figure.model_copy(update={"n": None}) if figure.suppressed else figure


def suppress_table(groups: dict[str, GroupReport], pooled: str, k: int
                   ) -> dict[str, GroupReport]:
    """Primary and complementary suppression of every figure of one table, withheld n's
    hidden; ``pooled`` names the pooled group."""
    primary = {name: suppress_group(g, k) for name, g in groups.items()}
    keys = list(dict.fromkeys(key for g in primary.values() for key in g.figures))
    figures: dict[str, dict[str, Figure]] = {name: dict(g.figures) for name, g in primary.items()}
    for key in keys:
        column = {name: f[key] for name, f in figures.items() if key in f}
        for name, figure in _complement(column, pooled, k).items():
            figures[name][key] = figure
    return {name: g.model_copy(update={"figures": {key: _hide_n(f) for key, f
                                                   in figures[name].items()}})
            for name, g in primary.items()}

"""The site's published description of its catalog (the federated catalog): built from the
de-identified catalog and the site's own policy, with nothing finer than that policy
allows. Counts go through :mod:`tributary.spoke.cell_suppression`; dates are reduced to
years that at least k cases support; attributes are NAMES, and only those the site's
release policy lists (any other attribute, such as an identifier used for linkage, never
appears), present on at least k cases."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from tributary.protocol.cohorts.catalog import (
    CountCell,
    ReleaseTerms,
    SpokeDescription,
    YearRange,
    code_of,
)
from tributary.spoke.catalog import Catalog
from tributary.spoke.cell_suppression import TOTAL, case_table, protect
from tributary.spoke.config import SpokeConfig


def generalised_years(years: list[int], k: int) -> YearRange | None:
    """``first``: the year by which k cases had been catalogued; ``last``: the year of the
    k-th most recent. None with fewer than k cases (no year is then supported by k)."""
    if len(years) < k:
        return None
    ordered = sorted(years)
    return YearRange(first=ordered[k - 1], last=max(ordered[-k], ordered[k - 1]))


def describe(config: SpokeConfig, catalog: Catalog,
             now: datetime | None = None) -> SpokeDescription:
    """The description this site may publish now."""
    k = config.counts.min_cell
    cases = catalog.cases()
    terms = ReleaseTerms(
        min_cell=k, counts_enabled=config.counts.enabled,
        steward_approves_experiments=config.steward.approve_experiments,
        steward_reviews_results=config.steward.review_results,
        log_tails=config.policy.log_tails, max_output_bytes=config.policy.max_output_bytes,
        training=config.training.enabled)
    profile = catalog.deid_profile()
    base = {"spoke_id": config.spoke_id, "generated_at": now or datetime.now(UTC),
            "terms": terms, "deid_profile": profile,
            "deid_options": config.deidentification.option_codes() if profile else []}
    if len(cases) < k:
        return SpokeDescription(**base)
    table = case_table({(code_of(s.modality), code_of(s.body_part)) for s in case.series}
                       for case in cases)
    published = protect(table, k)
    if TOTAL not in published:
        return SpokeDescription(**base)
    cells = [CountCell(modality=m, body_part=b, cases=count)
             for (m, b), count in sorted(published.items(),
                                         key=lambda item: (item[0][0] or "", item[0][1] or ""))
             if (m, b) != TOTAL]
    releasable = set(config.policy.releasable_attributes)
    present = Counter(name for case in cases for name in case.attributes if name in releasable)
    return SpokeDescription(
        **base, cases=published[TOTAL],
        studies=len({s.study_id for case in cases for s in case.series}),
        series=sum(len(case.series) for case in cases), cells=cells,
        years=generalised_years(catalog.catalogued_years(), k),
        attributes=sorted(name for name, count in present.items() if count >= k))

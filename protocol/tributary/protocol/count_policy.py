"""Which selections a federated count may use. Hub and spoke apply the same rule (the hub to
refuse early, the spoke because it does not trust the hub): a count names no case and caps
nothing, since "all cases" against "all but case X", or against "at most n - 1 cases",
singles out one case. Experiments may still select by case id or cap their cohort."""

from __future__ import annotations

from tributary.protocol.messages import CohortSelection

#: Selection fields a count may not use, and why.
FORBIDDEN_IN_COUNTS = {
    "case_ids": "a count may not select by case id (case_ids): two counts that differ by "
                "one case id single that case out",
    "max_cases": "a count may not cap its cases (max_cases): a cap one below the true count "
                 "differences out a single case",
}


def count_selection_problem(selection: CohortSelection) -> str | None:
    """Why ``selection`` may not be counted, or None if it may."""
    for field, reason in FORBIDDEN_IN_COUNTS.items():
        if getattr(selection, field) is not None:
            return reason
    return None

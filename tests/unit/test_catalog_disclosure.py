"""The federated catalog's disclosure control: a spoke's published description never lets
anyone show that a small cell holds even one case. The attacker here works only from what
a description publishes (plus, to be hard on ourselves, every modality and body part name
the site has), sets up the additive relations and minimises each small cell with a linear
program; the attack must get nothing, and it must succeed against primary suppression
alone (so the attack itself is shown to work)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linprog

from tributary.protocol.cohorts.catalog import (
    CatalogDescriptionMessage,
    CountCell,
    ReleaseTerms,
    SpokeDescription,
    YearRange,
    code_of,
    open_description,
    sign_description,
)
from tributary.protocol.signing import SigningKey
from tributary.spoke.catalog_publisher import PublishedState, decide
from tributary.spoke.cell_suppression import CaseTable, case_table, protect
from tributary.spoke.description import generalised_years

TERMS = ReleaseTerms(min_cell=5, counts_enabled=True, steward_approves_experiments=False,
                     steward_reviews_results=False, log_tails=True, max_output_bytes=1 << 20,
                     training=False)


def attack(table: CaseTable, published: dict, target: tuple) -> float:
    """The least value of ``target`` consistent with the published entries, for an
    attacker who knows every name in the table and which of its lines have no case in two
    cells (there, the parts sum to the margin; elsewhere each part is at most the margin
    and the margin at most their sum)."""
    values = table.entries()
    modalities, parts = list(table.modalities), list(table.body_parts)
    keys = list(values)
    index = {k: i for i, k in enumerate(keys)}
    lines = ([((m, None), [(m, b) for b in parts]) for m in modalities]
             + [((None, b), [(m, b) for m in modalities]) for b in parts]
             + [((None, None), [(m, None) for m in modalities]),
                ((None, None), [(None, b) for b in parts])])
    a_eq, a_ub = [], []
    for margin, members in lines:
        if sum(values[p] for p in members) == values[margin]:
            row = np.zeros(len(keys))
            row[index[margin]] -= 1
            for p in members:
                row[index[p]] += 1
            a_eq.append(row)
            continue
        row = np.zeros(len(keys))
        row[index[margin]] += 1
        for p in members:
            row[index[p]] -= 1
            part = np.zeros(len(keys))
            part[index[p]], part[index[margin]] = 1, -1
            a_ub.append(part)
        a_ub.append(row)
    bounds = [(published[k], published[k]) if k in published else (0, None) for k in keys]
    objective = np.zeros(len(keys))
    objective[index[target]] = 1
    result = linprog(objective, A_eq=np.array(a_eq) if a_eq else None,
                     b_eq=np.zeros(len(a_eq)) if a_eq else None,
                     A_ub=np.array(a_ub) if a_ub else None,
                     b_ub=np.zeros(len(a_ub)) if a_ub else None,
                     bounds=bounds, method="highs")
    assert result.status == 0, result.message
    return float(result.fun)


def published_from(description: SpokeDescription) -> dict:
    values = {(c.modality, c.body_part): c.cases for c in description.cells}
    if description.cases is not None:
        values[(None, None)] = description.cases
    return values


def small_cells(table: CaseTable, k: int) -> list[tuple]:
    return [key for key, value in table.entries().items() if 0 < value < k]


def describe_table(table: CaseTable, k: int = 5) -> SpokeDescription:
    published = protect(table, k)
    cells = [CountCell(modality=m, body_part=b, cases=v) for (m, b), v in published.items()
             if (m, b) != (None, None)]
    terms = TERMS.model_copy(update={"min_cell": k})
    if (None, None) not in published:
        return SpokeDescription(spoke_id="north", generated_at=datetime.now(UTC),
                                terms=terms)
    return SpokeDescription(spoke_id="north", generated_at=datetime.now(UTC),
                            cases=published[(None, None)], cells=cells, terms=terms)


def test_a_small_cell_is_not_recoverable_from_its_margin() -> None:
    # 12 CT cases: 10 of the chest, 2 of the head. Publishing the chest and the CT margin
    # would give the head away as 12 - 10.
    table = case_table([{("CT", "CHEST")}] * 10 + [{("CT", "HEAD")}] * 2)
    naive = {key: v for key, v in table.entries().items() if v >= 5}
    assert attack(table, naive, ("CT", "HEAD")) == 2  # the attack works on naive output
    description = describe_table(table)
    assert description.cell("CT", "HEAD") is None  # the small cell is suppressed
    assert description.cases == 12
    assert attack(table, published_from(description), ("CT", "HEAD")) == 0
    assert attack(table, published_from(description), (None, "HEAD")) == 0


def test_complementary_suppression_in_a_two_way_table() -> None:
    cases = ([{("CT", "CHEST")}] * 20 + [{("CT", "HEAD")}] * 9 + [{("MR", "HEAD")}] * 30
             + [{("MR", "KNEE")}] * 1 + [{("CT", "KNEE")}] * 8 + [{("CR", "CHEST")}] * 3)
    table = case_table(cases)
    description = describe_table(table)
    published = published_from(description)
    assert description.cases == 71
    for key in small_cells(table, 5):
        assert key not in published
        assert attack(table, published, key) == 0, key
    # Big cells the protection did not need stay published.
    assert description.cell("MR", "HEAD") == 30


@pytest.mark.parametrize("seed", range(60))
def test_no_small_cell_is_recoverable_in_random_tables(seed: int) -> None:
    rng = np.random.default_rng(seed)
    modalities = ["CT", "MR", "CR", "US", "PT"][: rng.integers(1, 6)]
    parts = ["CHEST", "HEAD", "KNEE", "ABDOMEN", "UNSPECIFIED", "PELVIS"][: rng.integers(1, 7)]
    cases = []
    for _ in range(rng.integers(0, 120)):
        combos = {(str(rng.choice(modalities)), str(rng.choice(parts)))}
        if rng.random() < 0.2:  # some cases have two kinds of series
            combos.add((str(rng.choice(modalities)), str(rng.choice(parts))))
        cases.append(combos)
    k = int(rng.integers(2, 11))
    table = case_table(cases)
    description = describe_table(table, k)
    published = published_from(description)
    assert all(v >= k for v in published.values())
    if description.cases is None:
        assert not description.cells and (len(cases) < k or not published)
        return
    for key in small_cells(table, k):
        assert key not in published
        assert attack(table, published, key) < 1e-9, (key, table, published)


def test_fewer_than_k_cases_publish_no_count() -> None:
    table = case_table([{("CT", "CHEST")}] * 4)
    description = describe_table(table)
    assert description.cases is None and description.cells == []
    with pytest.raises(ValueError, match="lists no counts"):
        SpokeDescription(spoke_id="north", generated_at=datetime.now(UTC), terms=TERMS,
                         cells=[CountCell(modality="CT", cases=9)])


def test_a_description_cannot_list_a_cell_below_its_own_k() -> None:
    with pytest.raises(ValueError, match="below"):
        SpokeDescription(spoke_id="north", generated_at=datetime.now(UTC), terms=TERMS,
                         cases=40, cells=[CountCell(modality="CT", cases=3)])


def test_years_are_supported_by_k_cases() -> None:
    # The lone 2015 and 2026 cases, and the three of 2021, are each fewer than k.
    years = [2015] + [2019] * 6 + [2021] * 3 + [2026]
    assert generalised_years(years, 5) == YearRange(first=2019, last=2019)
    assert generalised_years([*years, 2022, 2022], 5) == YearRange(first=2019, last=2021)
    assert generalised_years(years[:4], 5) is None


def test_codes_from_devices_are_described_as_code_strings() -> None:
    assert code_of("chest ") == "CHEST"
    assert code_of(None) == code_of("") == "UNSPECIFIED"
    assert code_of("John Smith's knee!") == "OTHER"


def test_successive_descriptions_differ_by_at_least_k_cases() -> None:
    first = SpokeDescription(spoke_id="north", generated_at=datetime.now(UTC), terms=TERMS,
                             cases=40, cells=[CountCell(modality="CT", cases=40)])
    sent = PublishedState(digest=first.digest(), content=first.content(), true_cases=40)
    assert decide(None, first, 40, 5) == "first description"
    assert decide(sent, first, 40, 5) is None
    one_more = first.model_copy(update={"cases": 41,
                                        "cells": [CountCell(modality="CT", cases=41)]})
    assert decide(sent, one_more, 41, 5) is None  # one new patient: not published
    five_more = first.model_copy(update={"cases": 45,
                                         "cells": [CountCell(modality="CT", cases=45)]})
    assert decide(sent, five_more, 45, 5) == "cases changed by at least k"
    stricter = first.model_copy(update={"terms": TERMS.model_copy(
        update={"steward_reviews_results": True})})
    assert decide(sent, stricter, 41, 5) == "policy or profile changed"


def test_the_description_is_signed_and_bound_to_its_spoke(tmp_path: Path) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    description = SpokeDescription(spoke_id="north", generated_at=datetime.now(UTC),
                                   terms=TERMS, cases=40,
                                   cells=[CountCell(modality="CT", cases=40)])
    message = sign_description(description, key)
    assert open_description(message, [key.public]) == description
    with pytest.raises(ValueError, match="signature"):
        open_description(message, [other.public])
    # Another spoke cannot pass north's description off as its own...
    stolen = CatalogDescriptionMessage(spoke_id="south", digest=message.digest,
                                       envelope=message.envelope)
    with pytest.raises(ValueError, match="north"):
        open_description(stolen, [key.public])
    # ... nor can anyone alter the numbers under the signature.
    payload = json.loads(base64.b64decode(message.envelope["payload"]))
    payload["cases"] = 400
    forged = dict(message.envelope, payload=base64.b64encode(
        json.dumps(payload).encode()).decode())
    with pytest.raises(ValueError):
        open_description(message.model_copy(update={"envelope": forged}), [key.public])

"""Statistical disclosure control for the catalog's table of cases by modality and body
part: which of its cells, margins and total may be published so that no count below the
site's ``k`` can be recovered from the published ones.

The table is (modality, body part) cells, each modality's margin, each body part's
margin and the total. A case with series of several modalities or body parts counts in
several cells, so where cases overlap a margin is less than the sum of its cells; where
none do, it is the sum, and an attacker may know which: the check assumes they do.

*Primary* suppression withholds every count from 1 to k-1. Zero counts are not published
either (a description lists only published cells), so an absent cell may be zero or
suppressed. *Complementary* suppression then withholds further counts until, for every
primary cell, the smallest value the published numbers allow (a linear program over the
unpublished ones, with the additive relations, as an attacker would set it up) is 0: no
one can show from the description that even one such case exists, let alone how many.
Withholding more only widens what is possible, so the loop ends, at worst with nothing
but the total published."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import linprog

#: One entry of the table: (modality, body part); None on a side is its margin, (None,
#: None) the total.
Key = tuple[str | None, str | None]
TOTAL: Key = (None, None)
#: A table as a hashable value: cells, modality margins, body-part margins, total.
FrozenTable = tuple[tuple[tuple[tuple[str, str], int], ...], tuple[tuple[str, int], ...],
                    tuple[tuple[str, int], ...], int]


@dataclass(frozen=True)
class CaseTable:
    """Counts of cases by (modality, body part), their margins and the total."""

    cells: Mapping[tuple[str, str], int]
    modalities: Mapping[str, int]
    body_parts: Mapping[str, int]
    total: int

    def entries(self) -> dict[Key, int]:
        """Every entry of the full grid, zeros included."""
        values: dict[Key, int] = {TOTAL: self.total}
        for modality, count in self.modalities.items():
            values[(modality, None)] = count
        for part, count in self.body_parts.items():
            values[(None, part)] = count
        for modality in self.modalities:
            for part in self.body_parts:
                values[(modality, part)] = self.cells.get((modality, part), 0)
        return values

    def frozen(self) -> FrozenTable:
        """The table as a hashable value."""
        return (tuple(sorted(self.cells.items())), tuple(sorted(self.modalities.items())),
                tuple(sorted(self.body_parts.items())), self.total)

    def lines(self) -> list[tuple[Key, list[Key]]]:
        """The additive relations: (sum entry, the entries summing to it)."""
        rows = [((m, None), [(m, b) for b in self.body_parts]) for m in self.modalities]
        cols = [((None, b), [(m, b) for m in self.modalities]) for b in self.body_parts]
        return [*rows, *cols, (TOTAL, [(m, None) for m in self.modalities]),
                (TOTAL, [(None, b) for b in self.body_parts])]


def lower_bound(table: CaseTable, published: Mapping[Key, int], key: Key) -> float:
    """The least value ``key`` can take given the ``published`` entries, every unpublished
    entry being any number >= 0, and the relations between entries: for each line (a row,
    a column, the margins) whose parts sum to its margin in the true table (no case in two
    of them), that equality; for the others what always holds (each part at most the
    margin, the margin at most the sum). An attacker who knew which lines overlap could
    do no better: this is what is computed, assuming they do."""
    if key in published:
        return float(published[key])
    values = table.entries()
    unknown = sorted((k for k in values if k not in published), key=_order)
    index = {k: i for i, k in enumerate(unknown)}

    def linear(terms: list[tuple[Key, float]]) -> tuple[np.ndarray, float]:
        row, constant = np.zeros(len(unknown)), 0.0
        for part, sign in terms:
            if part in index:
                row[index[part]] += sign
            else:
                constant += sign * published[part]
        return row, constant

    equal, equal_rhs, upper, upper_rhs = [], [], [], []
    for total, parts in table.lines():
        if sum(values[p] for p in parts) == values[total]:
            row, constant = linear([(total, -1.0), *[(p, 1.0) for p in parts]])
            if row.any():
                equal.append(row)
                equal_rhs.append(-constant)
            continue
        for terms in ([(total, 1.0), *[(p, -1.0) for p in parts]],
                      *[[(p, 1.0), (total, -1.0)] for p in parts]):
            row, constant = linear(terms)
            if row.any():
                upper.append(row)
                upper_rhs.append(-constant)
    objective = np.zeros(len(unknown))
    objective[index[key]] = 1.0
    result = linprog(objective,
                     A_eq=np.array(equal) if equal else None,
                     b_eq=np.array(equal_rhs) if equal else None,
                     A_ub=np.array(upper) if upper else None,
                     b_ub=np.array(upper_rhs) if upper else None,
                     bounds=[(0, None)] * len(unknown), method="highs")
    if result.status != 0:  # the true table is always a solution: a bug, refuse to publish
        raise ValueError(f"disclosure check failed: {result.message}")
    return float(result.fun)


def protect(table: CaseTable, k: int) -> dict[Key, int]:
    """The entries that may be published (each at least ``k``), the rest withheld so that
    no primary cell's lower bound is above 0. Empty when the total is below ``k``. The
    last answers are remembered: the publisher asks again every minute, and a large
    site's table takes seconds."""
    return dict(_protect(table.frozen(), k))


@lru_cache(maxsize=4)
def _protect(frozen: FrozenTable, k: int) -> tuple[tuple[Key, int], ...]:
    cells, modalities, parts, total = frozen
    table = CaseTable(dict(cells), dict(modalities), dict(parts), total)
    values = table.entries()
    if table.total < k:
        return ()
    published = {key: v for key, v in values.items() if v >= k}
    primary = [key for key, v in values.items() if 0 < v < k]
    for key in primary:
        while lower_bound(table, published, key) > 1e-9:
            extra = _complement(table, published, key)
            if extra is None:  # nothing left to withhold but the total
                return ()
            del published[extra]
    return tuple(sorted(published.items(), key=lambda item: _order(item[0])))


def _complement(table: CaseTable, published: Mapping[Key, int], key: Key) -> Key | None:
    """The published entry to withhold next to protect ``key``: the smallest one on a line
    with it, else the smallest anywhere (never the total)."""
    near: set[Key] = set()
    for total, parts in table.lines():
        members = [total, *parts]
        if key in members:
            near.update(members)
    for pool in (near, set(published)):
        candidates = [k for k in pool if k in published and k != TOTAL]
        if candidates:
            return min(candidates, key=lambda k: (published[k], _order(k)))
    return None


def _order(key: Key) -> tuple[str, str]:
    return (key[0] or "", key[1] or "")


def case_table(cases: Iterable[set[tuple[str, str]]]) -> CaseTable:
    """The table of a list of cases, each given as its set of (modality, body part)."""
    cells: dict[tuple[str, str], int] = {}
    modalities: dict[str, int] = {}
    parts: dict[str, int] = {}
    total = 0
    for combos in cases:
        total += 1
        for combo in combos:
            cells[combo] = cells.get(combo, 0) + 1
        for modality in {m for m, _ in combos}:
            modalities[modality] = modalities.get(modality, 0) + 1
        for part in {b for _, b in combos}:
            parts[part] = parts.get(part, 0) + 1
    return CaseTable(cells, modalities, parts, total)

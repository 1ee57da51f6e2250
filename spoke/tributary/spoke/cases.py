"""Case preparation: which of the site's cases an experiment runs (its cohort, selected
from the catalog and known from then on by ids released for that study only) and what the
container of one case is given (the participant JSON and the de-identified series folders
it mounts). No catalog pseudonym leaves this module: not in a participant, a result, a
custody record, a log line or the steward's desk."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from tributary.protocol.contract import Participant
from tributary.protocol.messages import ExperimentMessage
from tributary.protocol.signing import sha256_hex
from tributary.spoke.case_ids import ReleasedCaseIds
from tributary.spoke.catalog import CatalogCase
from tributary.spoke.config import SpokeConfig
from tributary.spoke.custody import input_digest
from tributary.spoke.ingest import open_catalog, refresh_catalog, series_folders
from tributary.spoke.lifecycle import Lifecycle
from tributary.spoke.participant import build_participant


@dataclass(frozen=True)
class CaseInput:
    """What one case's container is given, and the digests its custody record states."""

    participant: Participant
    mounts: dict[str, Path]
    input_sha256: str
    participant_sha256: str


class Cases:
    """The cohorts of the experiments under way, kept per process, and the input of each
    case. A cohort is forgotten when its experiment finishes (selected again should a
    retry come)."""

    def __init__(self, config: SpokeConfig, lifecycle: Lifecycle,
                 case_ids: ReleasedCaseIds) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.case_ids = case_ids
        self._cohorts: dict[str, dict[str, CatalogCase]] = {}
        self._lock = threading.Lock()
        lifecycle.on_finished(self.forget)

    def select(self, message: ExperimentMessage) -> dict[str, CatalogCase]:
        """The experiment's cohort from the catalog, after an incremental ingest of the
        sources (unless the site ingests on a schedule), recorded in the journal. Raises
        :class:`~tributary.spoke.catalog.SelectionRefused` for criteria the site's release
        policy forbids."""
        cohort = message.cohort
        with open_catalog(self.config) as catalog:
            refresh_catalog(self.config, catalog, self.lifecycle.audit, message.experiment_id)
            # Ids the hub names are released ids of this study, never catalog pseudonyms.
            selected = catalog.select(cohort.model_copy(update={"case_ids": None, "max_cases":
                                                                None}))
        by_released = self._released(message.experiment_id, selected)
        if cohort.case_ids is not None:
            wanted = set(cohort.case_ids)
            by_released = {r: c for r, c in by_released.items() if r in wanted}
        if cohort.max_cases:
            by_released = dict(list(by_released.items())[:cohort.max_cases])
        self.lifecycle.journal.record_released(message.experiment_id,
                                               {r: c.case_id for r, c in by_released.items()})
        self.lifecycle.audit("cohort.selected", message.experiment_id, cases=len(by_released),
                             criteria=cohort.model_dump(mode="json"))
        with self._lock:
            cases = self._cohorts[message.experiment_id] = _as_released(by_released)
        return cases

    def cohort(self, message: ExperimentMessage) -> dict[str, CatalogCase]:
        """The experiment's cases by id. After a restart (or for a retry) they are read
        again from the catalog without the ``max_cases`` cut: which cases run was decided
        when the experiment was accepted and is in the journal."""
        with self._lock:
            cases = self._cohorts.get(message.experiment_id)
            if cases is None:
                with open_catalog(self.config) as catalog:
                    selected = catalog.select(message.cohort.model_copy(
                        update={"case_ids": None, "max_cases": None}))
                kept = self.lifecycle.journal.released_cases(message.experiment_id)
                cases = self._cohorts[message.experiment_id] = _as_released({
                    r: c for r, c in self._released(message.experiment_id, selected).items()
                    if kept.get(r) == c.case_id})
            return cases

    def forget(self, experiment_id: str) -> None:
        with self._lock:
            self._cohorts.pop(experiment_id, None)

    def store_profile(self) -> str | None:
        """The de-identification profile the store's files were made under (the catalog's
        record), which a custody record states."""
        with open_catalog(self.config) as catalog:
            return catalog.deid_profile()

    def input(self, experiment_id: str, case: CatalogCase) -> CaseInput:
        """The participant JSON and mounts of one case: only the de-identified store's
        series folders are ever mounted, under study-scoped series ids."""
        deidentified = series_folders(self.config, [s.series_id for s in case.series])
        participant, mounts = build_participant(case, experiment_id, deidentified)
        participant = participant.model_copy(update={"series": [s.model_copy(update={
            "series_id": self.case_ids.released_series(experiment_id, s.series_id)})
            for s in participant.series]})
        return CaseInput(participant, mounts, input_digest(deidentified),
                         sha256_hex(participant.model_dump_json(indent=2).encode()))

    def names_store_pseudonym(self, experiment_id: str, case: CatalogCase,
                              output: dict) -> bool:
        """Whether ``output`` contains the catalog's pseudonym of the case or of one of its
        series: the de-identified headers an algorithm reads carry them (PatientID is the
        case pseudonym), and an echo would link the patient across studies."""
        text = json.dumps(output).lower()
        catalog_id = self.lifecycle.journal.released_cases(experiment_id).get(case.case_id)
        secrets = [catalog_id] if catalog_id else []
        secrets += [s.series_id for s in case.series]
        return any(secret.lower().removeprefix("c-").removeprefix("s-") in text
                   for secret in secrets)

    def _released(self, experiment_id: str,
                  selected: list[CatalogCase]) -> dict[str, CatalogCase]:
        """The catalog's cases by the id released for this study, in catalog order."""
        return {self.case_ids.released(experiment_id, c.case_id): c for c in selected}


def _as_released(cases: dict[str, CatalogCase]) -> dict[str, CatalogCase]:
    """Each case carrying its released id from here on, so no catalog pseudonym reaches a
    result, a container, a custody record, a log line or the steward's desk."""
    return {released: replace(case, case_id=released) for released, case in cases.items()}

"""The participant JSON handed to an algorithm: de-identified metadata only, from the
catalog, with series paths as the container sees them."""

from __future__ import annotations

from pathlib import Path

from tributary.protocol.contract import INPUT_ROOT, Participant, ParticipantSeries
from tributary.spoke.catalog import CatalogCase


def container_series_path(index: int) -> str:
    return f"{INPUT_ROOT}/series-{index:03d}"


def build_participant(case: CatalogCase, experiment_id: str,
                      deidentified: dict[str, Path]) -> tuple[Participant, dict[str, Path]]:
    """The participant model and the host folder (in the de-identified store) to mount at
    each container path."""
    series = []
    mounts: dict[str, Path] = {}
    for index, source in enumerate(case.series, start=1):
        path = container_series_path(index)
        mounts[path] = deidentified[source.series_id]
        series.append(ParticipantSeries(
            series_id=source.series_id, modality=source.modality, path=path,
            instance_count=source.instance_count, rows=source.rows, columns=source.columns,
            body_part=source.body_part,
        ))
    return Participant(case_id=case.case_id, experiment_id=experiment_id, series=series), mounts

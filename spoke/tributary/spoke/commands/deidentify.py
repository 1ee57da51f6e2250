"""``tributary spoke deidentify SRC DST``: de-identify a folder for a data steward, with the
spoke's pseudonym key and the PS3.15 profile and options, and a JSON report of every file
that was excluded or flagged and why.

Output layout: ``DST/<case pseudonym>/<series pseudonym>/<new SOP Instance UID>.dcm``, so
no source file or folder name (which often carry names or record numbers) reaches DST.
The report holds source paths and is written beside DST, never inside it."""

from __future__ import annotations

import getpass
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer


def main(
    src: Annotated[Path, typer.Argument(exists=True, file_okay=False,
                                        help="Folder of DICOM files (searched recursively).")],
    dst: Annotated[Path, typer.Argument(help="Folder to write de-identified files to.")],
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", exists=True, dir_okay=False,
        help="The spoke's TOML configuration: use the spoke's pseudonym key and its "
             "de-identification options (flags override them).")] = None,
    key: Annotated[Path | None, typer.Option(
        help="Pseudonym key file (created, mode 600, if missing) when not using --config.")
    ] = None,
    report: Annotated[Path | None, typer.Option(
        help="Where to write the JSON report (default: DST-report.json beside DST).")] = None,
    retain_modified_dates: Annotated[bool | None, typer.Option(
        help="Retain Longitudinal Temporal Information with Modified Dates.")] = None,
    retain_patient_characteristics: Annotated[bool | None, typer.Option(
        help="Retain Patient Characteristics (sex, age, size, weight...).")] = None,
    retain_device_identity: Annotated[bool | None, typer.Option(
        help="Retain Device Identity (serial numbers, station names...).")] = None,
    retain_institution_identity: Annotated[bool | None, typer.Option(
        help="Retain Institution Identity (institution name, address, department).")
    ] = None,
    clean_descriptors: Annotated[bool | None, typer.Option(
        help="Clean Descriptors: keep descriptions, identifiers scrubbed out.")] = None,
    retain_safe_private: Annotated[bool | None, typer.Option(
        help="Retain Safe Private: keep the private attributes of --safe-private.")] = None,
    safe_private: Annotated[list[str] | None, typer.Option(
        help="A safe private attribute as CREATOR:GGGG:EE (hex), repeatable; replaces "
             "the configuration's list.")] = None,
    clean_pixel_data: Annotated[bool | None, typer.Option(
        help="Clean Pixel Data: blank the regions of the configuration's pixel masks.")
    ] = None,
    allow_burned_in: Annotated[bool | None, typer.Option(
        help="Accept images declaring BurnedInAnnotation YES.")] = None,
    text_detection: Annotated[str | None, typer.Option(
        help="Find burned-in text with OCR: text-prone (secondary captures, ultrasound, "
             "screenshots, dose reports...), all, or off.")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Processes to de-identify with (default: the cores this process may "
                    "use); the result is the same for any number.")] = None,
) -> None:
    """De-identify every DICOM file under SRC into DST and report what was left out."""
    from tributary.spoke.startup import lean_start, started

    lean_start()  # before anything imports pydicom or builds a pydantic model
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from tributary.protocol.auditlog import AuditLog
        from tributary.spoke.commands.progress import bars
        from tributary.spoke.deid import DeidOptions, SafePrivate, Screener, profile_name
        from tributary.spoke.deid.screening import EXCLUDING, Reason
        from tributary.spoke.folder_deid import FolderRun, prepared
        from tributary.spoke.folder_report import DeidRunReport, OutputFile
        from tributary.spoke.pseudonyms import Pseudonymizer
    finally:
        started()

    console = Console(emoji=False)  # paths are data: escaped, and no :emoji: codes
    if (config is None) == (key is None):
        raise typer.BadParameter("give exactly one of --config and --key")
    # With --config the spoke's own [deidentification] options are the starting point, so
    # a steward's folder is prepared exactly as the spoke's store is; flags override them.
    base = DeidOptions()
    if config is not None:
        from tributary.spoke.config import SpokeConfig

        spoke_config = SpokeConfig.load(config)
        key, base = spoke_config.work_dir / "pseudonym.key", spoke_config.deidentification
    assert key is not None
    # The run is audited in the spoke's log (or one beside the key file used instead).
    audit_log = key.parent / "audit.jsonl"
    entries = []
    for text in safe_private or []:
        try:
            creator, group, element = text.rsplit(":", 2)
            entries.append(SafePrivate(creator=creator, group=int(group, 16),
                                       element=int(element, 16)))
        except ValueError as exc:
            raise typer.BadParameter(f"{text!r}: expected CREATOR:GGGG:EE ({exc})") from None
    chosen = {"retain_modified_dates": retain_modified_dates,
              "retain_patient_characteristics": retain_patient_characteristics,
              "retain_device_identity": retain_device_identity,
              "retain_institution_identity": retain_institution_identity,
              "clean_descriptors": clean_descriptors,
              "retain_safe_private": retain_safe_private, "allow_burned_in": allow_burned_in,
              "clean_pixel_data": clean_pixel_data, "text_detection": text_detection,
              "safe_private": tuple(entries) if safe_private is not None else None}
    if text_detection not in (None, "text-prone", "all", "off"):
        raise typer.BadParameter("--text-detection: text-prone, all or off")
    options = base.model_copy(update={k: v for k, v in chosen.items() if v is not None})
    src, dst = src.resolve(), dst.resolve()
    if dst == src or src in dst.parents:
        raise typer.BadParameter("DST must not be inside SRC")
    report = report or dst.with_name(dst.name + "-report.json")
    pseudonyms = Pseudonymizer.from_key_file(key)
    profile = profile_name(options)
    started = datetime.now(UTC)
    # Every entry but folders: a FIFO, device or socket is listed, and excluded unread
    # with its reason, rather than silently skipped (or opened, and waited on forever).
    paths = sorted(Path(folder) / name for folder, _, names in os.walk(src) for name in names)
    screener = Screener(options, pseudonyms, hash_pixels=False)
    run = FolderRun(screener, dst)
    run.open()
    try:
        results = prepared(paths, src, key, options, run.staging, workers)
        with bars(console) as shown:  # no refresh thread: the workers may be forked
            for done, result in enumerate(results, start=1):
                run.take(result)
                shown.show("de-identifying", done, len(paths))
    finally:
        run.close()
    outputs = [OutputFile(**vars(o)) for o in run.outputs]
    screening = screener.report()
    document = DeidRunReport(
        profile=profile, options=options.model_dump(mode="json"), source=str(src),
        destination=str(dst), started=started, finished=datetime.now(UTC),
        files_seen=len(paths), files_written=len(outputs), excluded=len(screening.excluded()),
        flagged=len(screening.flagged()), reasons=screening.counts(),
        screening=screening.model_dump(mode="json"), outputs=outputs)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(document.model_dump_json(indent=1) + "\n")
    AuditLog(audit_log).append(
        f"steward:{getpass.getuser()}", "deid.folder", str(dst),
        {"profile": profile, "report": str(report), "files_seen": len(paths),
         "files_written": len(outputs), "excluded": document.excluded,
         "flagged": document.flagged, "reasons": document.reasons})
    table = Table("reason", "files", "effect", title=escape(profile))
    for reason, count in sorted(document.reasons.items()):
        effect = "excluded" if Reason(reason) in EXCLUDING else "flagged for review"
        table.add_row(*(escape(str(v)) for v in (reason, count, effect)))
    console.print(table)
    incomplete = [s.series_id for s in screening.series if not s.complete]
    console.print(f"{len(outputs)} of {len(paths)} files written to {escape(str(dst))}; "
                  f"{document.excluded} excluded, {document.flagged} flagged, "
                  f"{len(incomplete)} incomplete series; report: {escape(str(report))}")


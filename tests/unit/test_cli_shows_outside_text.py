"""What others wrote is shown to the person deciding on it exactly as written: rich reads
``[...]`` as markup and ``:name:`` as an emoji code, so an algorithm's failure detail could
hide text (``[black on black]``, ``[conceal]``), fake a verdict (``[green]approved[/]``) or
plant a hyperlink (``[link=...]``) in the steward's review; the commands print such text as
data."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.protocol.auditlog import AuditLog
from tributary.protocol.messages import (
    CaseStatus,
    ExperimentMessage,
    Failure,
    FailureReason,
    ResultMessage,
)
from tributary.spoke.steward import StewardDesk

HOSTILE = ("see [black on black]hidden[/] [conceal]secret[/conceal] [green]approved[/] "
           "[link=https://evil.example/x]click[/link] :smile:")


def _flat(text: str) -> str:
    """The output without whitespace: rich wraps long lines anywhere."""
    return "".join(text.split())


def _spoke(tmp_path: Path) -> tuple[Path, Path]:
    work = tmp_path / "work"
    config = tmp_path / "spoke.toml"
    (tmp_path / "data").mkdir()
    config.write_text(f'spoke_id = "site-a"\ndata_dir = "data"\nwork_dir = "{work}"\n'
                      'hub_public_key = "hub.pem"\n')
    return config, work


def test_the_steward_reviews_failure_details_and_released_values_as_written(
        tmp_path: Path) -> None:
    config, work = _spoke(tmp_path)
    desk = StewardDesk(work / "journal.db")  # as the agent holds a result for review
    desk.hold_result(ResultMessage(
        experiment_id="exp-1", spoke_id="site-a", case_id="c-1", status=CaseStatus.FAILED,
        failure=Failure(reason=FailureReason.EXIT_CODE, detail=HOSTILE, exit_code=3),
        output={"note": HOSTILE + " END"}, released={"note": HOSTILE}), {"exit_code": 3})
    desk.close()
    result = CliRunner().invoke(app, ["spoke", "steward", "pending", "-c", str(config)])
    assert result.exit_code == 0, result.output
    shown = _flat(result.output)
    assert _flat(f"failure: exit_code: {HOSTILE}") in shown
    assert _flat(f'with attributes: {{"note": "{HOSTILE}"}}') in shown
    assert _flat(f'"note": "{HOSTILE} END"') in shown  # output.json whole, not cropped
    assert "😄" not in result.output
    assert _flat("1 result(s) waiting") in shown  # our own styles still render


def test_the_steward_reviews_an_experiments_arguments_whole(tmp_path: Path) -> None:
    """Arguments typed by the coordinator, with markup and a token longer than the terminal
    is wide: shown as written, wrapped, never cut off with an ellipsis."""
    config, work = _spoke(tmp_path)
    long = "a" * 150 + "END"
    message = ExperimentMessage.model_validate({
        "experiment_id": "exp-1", "spoke_id": "site-a", "algorithm": {
            "name": "alg", "version": "1", "repository": "registry:5000/alg",
            "digest": "sha256:" + "0" * 64}})
    desk = StewardDesk(work / "journal.db")  # as the agent holds an experiment for approval
    desk.hold_experiment(message, "{}", {
        "algorithm": "alg 1", "digest": message.algorithm.digest,
        "arguments": {"note": HOSTILE, "long": long}, "cohort": {}, "cohort_size": 3,
        "release_requested": [], "release_allowed": [], "limits": {}, "expires_at": None,
        "access_request": None})
    desk.close()
    result = CliRunner().invoke(app, ["spoke", "steward", "pending", "-c", str(config)])
    assert result.exit_code == 0, result.output
    shown = _flat(result.output.replace("│", " "))
    assert _flat(f'{{"note": "{HOSTILE}", "long": "{long}"}}') in shown, result.output
    assert "…" not in result.output


def test_status_shows_audit_entries_written_by_others_as_written(tmp_path: Path) -> None:
    config, work = _spoke(tmp_path)
    # short enough that no cell of the table wraps at 80 columns
    AuditLog(work / "audit.jsonl").append("[red]op:smile:", "x.y", "[link=https://e.x]1[/link]")
    result = CliRunner().invoke(app, ["spoke", "status", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "[red]op:smile:" in result.output
    assert "[link=https://e.x]1[/link]" in result.output


def test_written_files_are_reported_as_named(tmp_path: Path) -> None:
    folder = tmp_path / "schemas [final] :smile:"
    result = CliRunner().invoke(app, ["contract", "schemas", str(folder)],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    written = sorted(folder.iterdir())
    assert written
    for path in written:
        assert _flat(f"wrote {path}") in _flat(result.output)

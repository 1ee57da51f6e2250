"""Every channel by which bytes leave a spoke has a bound (the table in docs/security.md,
"Channels out of a spoke"); each test here sends a value at the bound and one past it. The
bounds are the constants in code the table quotes."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from tributary.protocol.contract import (
    DEFAULT_OUTPUT_LIMIT_BYTES,
    MAX_PROGRESS_REPORTS_PER_CASE,
    PROGRESS_FRACTION_STEP,
    ProgressStep,
)
from tributary.protocol.messages import (
    LOG_TAIL_MAX_BYTES,
    MAX_MESSAGE_BYTES,
    REASON_MAX_CHARS,
    CountReply,
    ExperimentState,
    ExperimentStatusMessage,
    Failure,
    FailureReason,
    HeartbeatMessage,
    RunningCase,
    decode_from_spoke,
)
from tributary.spoke.config import ReleasePolicy, RunnerSettings
from tributary.spoke.runner import OutputError, cut_log_tail, read_output

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def test_the_documented_table_quotes_the_constants() -> None:
    """The channels table states the same numbers the code enforces."""
    text = DOC.read_text()
    table = text[text.index("## Channels out of a spoke"):]
    for constant in (DEFAULT_OUTPUT_LIMIT_BYTES, LOG_TAIL_MAX_BYTES, REASON_MAX_CHARS,
                     MAX_PROGRESS_REPORTS_PER_CASE, MAX_MESSAGE_BYTES,
                     RunnerSettings().output_quota_mb):
        assert re.search(rf"\b{constant}\b", table), f"{constant} is not in the table"
    assert f"{PROGRESS_FRACTION_STEP}" in table
    assert f"{len(ProgressStep)} " in table


def test_output_json_at_the_bound_is_read_past_it_refused(tmp_path: Path) -> None:
    limit = ReleasePolicy().max_output_bytes
    assert limit == DEFAULT_OUTPUT_LIMIT_BYTES
    head, tail = '{"x": "', '"}'
    path = tmp_path / "output.json"
    path.write_text(head + "a" * (limit - len(head) - len(tail)) + tail)
    assert path.stat().st_size == limit
    assert read_output(path, limit)["x"]
    path.write_text(head + "a" * (limit - len(head) - len(tail) + 1) + tail)
    with pytest.raises(OutputError) as error:
        read_output(path, limit)
    assert error.value.reason == FailureReason.OUTPUT_TOO_LARGE


def test_log_tail_is_cut_to_its_bound_in_bytes() -> None:
    exact = b"x" * LOG_TAIL_MAX_BYTES
    assert cut_log_tail(exact) == exact.decode()
    wide = ("\u00e9\u4e2d\U0001f600" * 5000).encode()  # 2-, 3- and 4-byte characters
    tail = cut_log_tail(b"early lines\n" + wide)
    assert len(tail.encode()) <= LOG_TAIL_MAX_BYTES
    assert len(tail.encode()) > LOG_TAIL_MAX_BYTES - 4  # only a split character is lost
    assert wide.decode().endswith(tail)
    Failure(reason=FailureReason.EXIT_CODE, detail="x", log_tail=tail)


def test_failure_detail_bound() -> None:
    Failure(reason=FailureReason.EXIT_CODE, detail="d" * REASON_MAX_CHARS)
    with pytest.raises(ValidationError):
        Failure(reason=FailureReason.EXIT_CODE, detail="d" * (REASON_MAX_CHARS + 1))


def test_status_and_refusal_reasons_are_cut_at_the_bound() -> None:
    def status(reason: str) -> ExperimentStatusMessage:
        return ExperimentStatusMessage(experiment_id="e", spoke_id="site-a",
                                       state=ExperimentState.REFUSED, reason=reason)

    assert status("r" * REASON_MAX_CHARS).reason == "r" * REASON_MAX_CHARS
    assert status("r" * (REASON_MAX_CHARS + 500)).reason == "r" * REASON_MAX_CHARS
    # also what a hub parses: a hand-made longer reason is cut on arrival
    raw = status("ok").model_dump(mode="json")
    raw["reason"] = "r" * (REASON_MAX_CHARS * 3)
    parsed = decode_from_spoke(json.dumps(raw).encode())
    assert isinstance(parsed, ExperimentStatusMessage)
    assert parsed.reason is not None and len(parsed.reason) == REASON_MAX_CHARS


def test_count_answer_bound() -> None:
    CountReply(query_id="q", spoke_id="site-a", refused="r" * REASON_MAX_CHARS)
    with pytest.raises(ValidationError):
        CountReply(query_id="q", spoke_id="site-a", refused="r" * (REASON_MAX_CHARS + 1))
    with pytest.raises(ValidationError):  # a number, or a small cell, or a refusal: one
        CountReply(query_id="q", spoke_id="site-a", count=12, fewer_than=5)


def test_heartbeat_carries_only_rounded_vocabulary_progress() -> None:
    """What an algorithm can put in a heartbeat is the progress already sent (see
    tests/test_progress_channel.py): a rounded fraction and a step, nothing else."""
    with pytest.raises(ValidationError):
        RunningCase(experiment_id="e", case_id="c", started_at=datetime.now(UTC),
                    fraction=0.5, message="MRN 123456")
    beat = HeartbeatMessage(spoke_id="site-a", spoke_version="t", concurrency=1,
                            queue_depth=0, interval_seconds=30, running=[RunningCase(
                                experiment_id="e", case_id="c", started_at=datetime.now(UTC),
                                fraction=0.333, message=ProgressStep.LOADING)])
    assert beat.running[0].fraction == 0.35


def test_failure_diagnostics_are_bounded() -> None:
    """Applied limits and discarded files leave the spoke: bounded in count and length."""
    from pydantic import ValidationError as _Invalid

    from tributary.protocol.messages import (
        DISCARDED_NAME_MAX_CHARS,
        MAX_DISCARDED_FILES,
        AppliedLimits,
        DiscardedFile,
    )

    files = [DiscardedFile(name=f"f{i}", size_bytes=i) for i in range(MAX_DISCARDED_FILES)]
    ok = Failure(reason=FailureReason.EXIT_CODE, detail="x", log_withheld=True,
                 applied_limits=AppliedLimits(timeout_seconds=60, memory_mb=512, gpus=0),
                 discarded_files=files)
    assert ok.log_withheld and ok.log_tail is None
    with pytest.raises(_Invalid):
        Failure(reason=FailureReason.EXIT_CODE, detail="x",
                discarded_files=[*files, DiscardedFile(name="one-more", size_bytes=1)])
    with pytest.raises(_Invalid):
        DiscardedFile(name="n" * (DISCARDED_NAME_MAX_CHARS + 1), size_bytes=1)
    with pytest.raises(_Invalid):
        DiscardedFile(name="n", size_bytes=-1)
    with pytest.raises(_Invalid):
        AppliedLimits(gpus=65)

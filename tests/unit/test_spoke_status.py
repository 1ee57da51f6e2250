"""`tributary spoke status` reads a spoke's work folder as it is: whether an agent holds
it, the experiments and cases of its journal, what waits in the outbox and since when, the
catalog and the latest audit entries; and it never changes any of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_spoke_journal import experiment
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.protocol.auditlog import AuditLog
from tributary.spoke.journal import Journal, Outgoing, agent_pid, claim_work_dir


def status(config: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["spoke", "status", "-c", str(config), *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_status_of_a_spoke_work_folder(tmp_path: Path) -> None:
    work = tmp_path / "work"
    config = tmp_path / "spoke.toml"
    (tmp_path / "data").mkdir()
    config.write_text(f'spoke_id = "site-a"\ndata_dir = "data"\nwork_dir = "{work}"\n'
                      'hub_public_key = "hub.pem"\n')
    fresh = json.loads(status(config, "--json"))
    assert fresh["agent"] == {"running": False, "pid": None}
    assert fresh["journal"] is None and fresh["catalog"] is None
    assert "no journal yet" in status(config) and not work.exists()  # nothing created

    journal = Journal(work / "journal.db")
    journal.add_experiment(experiment("exp-1"))
    journal.settle_experiment("exp-1", "accepted", None, None, ["c-1", "c-2", "c-3"])
    journal.claim_next()  # c-1 runs
    journal.add_experiment(experiment("exp-0"))
    journal.settle_experiment("exp-0", "completed", None, None)
    journal.send_later(Outgoing("m-1", "result", "{}", {}))
    journal.send_later(Outgoing("m-2", "result", "{}", {}))
    journal.mark_sent(1)
    AuditLog(work / "audit.jsonl").append("site-a", "container.started", "c-1")
    lock = claim_work_dir(work)  # as the running agent holds it
    try:
        assert agent_pid(work) == os.getpid()
        document = json.loads(status(config, "--json"))
        text = status(config)
    finally:
        os.close(lock)
    assert document["agent"] == {"running": True, "pid": os.getpid()}
    state = document["journal"]
    assert state["experiments"] == {"accepted": 1, "completed": 1}
    assert state["cases"] == {"queued": 2, "running": 1}
    assert state["outbox_unsent"] == 1 and state["oldest_unsent_at"]
    [open_experiment] = state["open"]
    assert open_experiment["experiment_id"] == "exp-1"
    assert open_experiment["cases"] == {"queued": 2, "running": 1}
    assert [e["action"] for e in document["recent"]] == ["container.started"]
    assert f"running (pid {os.getpid()})" in text and "1 message(s) waiting" in text
    assert "exp-1" in text and "container.started" in text
    # Reading changed nothing, and left the lock free for the agent.
    assert agent_pid(work) is None
    assert Journal(work / "journal.db").outbox_depth() == 1

"""Many viewers of one study's live stream on a served hub (uvicorn, real sockets): every
viewer gets its first event promptly and the rest of the API still answers. Before, each
stream kept the database connection that authenticated it, and a burst of requests could
hold every pooled connection while their handlers waited for a thread: sixteen viewers
hung the hub for the pool's 30-second timeout."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from sqlmodel import Session

from tributary.hub.main import create_app
from tributary.hub.models import (
    Algorithm,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    TargetState,
)
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings

VIEWERS = 80


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _first_events(url: str, token: str) -> list[float]:
    """Seconds until each viewer's first progress event, all connecting at once."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(20, read=20),
                                 limits=httpx.Limits(max_connections=VIEWERS + 10)) as client:
        async def view() -> float:
            t0 = time.monotonic()
            async with client.stream("GET", "/api/experiments/exp-live/events") as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        return time.monotonic() - t0
            raise AssertionError("the stream ended without an event")

        viewers = [asyncio.create_task(view()) for _ in range(VIEWERS)]
        waits = await asyncio.gather(*viewers)
        health = await client.get("/api/spokes")  # the API answers beside them
        assert health.status_code == 200
        return waits


def test_many_viewers_connect_at_once(tmp_path: Path) -> None:
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-live",
                                         broker_port=_free_port())
    app = create_app(settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "hub did not start"
            time.sleep(0.05)
        with Session(app.state.engine) as session:
            session.add(Algorithm(id=1, name="a", version="1", repository="r/a",
                                  digest="sha256:" + "0" * 64))
            session.add(Spoke(id="north", name="north"))
            session.flush()
            session.add(Experiment(id="exp-live", name="live", algorithm_id=1,
                                   state=ExperimentState.LAUNCHED, aggregator="summary"))
            session.flush()
            session.add(ExperimentTarget(experiment_id="exp-live", spoke_id="north",
                                         state=TargetState.ACCEPTED, case_count=3))
            session.commit()
            create_user(session, "carol", "a long enough password", ["coordinator"])
            token, _ = issue_token(session, "carol", "a long enough password")  # type: ignore[misc]
        waits = asyncio.run(_first_events(f"http://127.0.0.1:{port}", token))
        assert len(waits) == VIEWERS
        assert max(waits) < 10, sorted(waits)[-5:]
    finally:
        server.should_exit = True
        thread.join(30)

"""The evidence that a container did or did not run is the engine's event stream watched
live: asking ``docker events --since`` afterwards misses what the engine already forgot
(it keeps only its latest events), so on a busy engine "nothing ran" would pass wrongly."""

from __future__ import annotations

import subprocess
import time
import uuid

import docker
import pytest

from tributary.testbed.containerwatch import ContainerWatch

pytestmark = pytest.mark.e2e


def _busy_engine(client: docker.DockerClient, events: int) -> None:
    """Other work on a shared engine: volumes created and removed, two events each."""
    for _ in range(events // 2):
        client.volumes.create(f"tributary-busy-{uuid.uuid4().hex[:12]}").remove()


def test_a_container_created_before_a_burst_of_events_is_still_seen(
        misbehaving_image: tuple[str, str]) -> None:
    label = f"org.tributary.spoke=watch-{uuid.uuid4().hex[:8]}"
    key, _, value = label.partition("=")
    client = docker.from_env()
    try:
        since = time.time()
        with ContainerWatch(label) as watch:
            container = client.containers.create(f"{misbehaving_image[0]}@{misbehaving_image[1]}",
                                                 labels={key: value})
            container.remove()
            _busy_engine(client, 300)
        assert len(watch.created()) == 1
        # What the engine still tells afterwards: its buffer has moved on.
        after = subprocess.run(["docker", "events", "--since", str(since), "--until",
                                str(time.time()), "--filter", "event=create", "--filter",
                                f"label={label}"], capture_output=True, text=True, check=True)
        assert after.stdout.strip() == "", "the engine kept more events than expected"
    finally:
        client.close()


def test_nothing_created_is_an_empty_list_and_other_labels_do_not_count(
        misbehaving_image: tuple[str, str]) -> None:
    label = f"org.tributary.spoke=watch-{uuid.uuid4().hex[:8]}"
    client = docker.from_env()
    try:
        watch = ContainerWatch(label).start()
        other = client.containers.create(f"{misbehaving_image[0]}@{misbehaving_image[1]}",
                                         labels={"org.tributary.spoke": "someone-else"})
        other.remove()
        assert watch.stop() == []
    finally:
        client.close()

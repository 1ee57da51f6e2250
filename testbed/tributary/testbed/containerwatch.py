"""Evidence that a container did, or did not, run: the engine's event stream, watched live
from before the action until after it. Querying ``docker events --since`` afterwards is not
evidence: the engine keeps only its most recent events, so on a busy engine a container
created during the test may already have been forgotten, and "nothing ran" would pass."""

from __future__ import annotations

import threading
import uuid
from types import TracebackType
from typing import Any

import docker

#: Label of the volume created as an end marker; its event follows every earlier one.
_MARKER_LABEL = "org.tributary.watch-marker"


class ContainerWatch:
    """Names of the containers created with ``label`` (``key=value``) while the watch is
    open: ``watch = ContainerWatch(label).start()`` before the action, ``watch.stop()``
    after it (or use it as a context manager and read :meth:`created` after the block)."""

    def __init__(self, label: str, timeout: float = 30) -> None:
        self.label_key, _, self.label_value = label.partition("=")
        self.timeout = timeout
        self._created: list[str] = []
        self._marker = f"tributary-watch-{uuid.uuid4().hex[:12]}"
        self._marker_seen = threading.Event()
        self._client = docker.from_env(timeout=120)
        self._stream: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ContainerWatch:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._close(wait=kind is None)

    def start(self) -> ContainerWatch:
        # The request returns once the engine has subscribed us: every later event is ours.
        self._stream = self._client.events(decode=True, filters={
            "type": ["container", "volume"], "event": ["create"]})
        self._thread = threading.Thread(target=self._read, name="container-watch",
                                        daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        try:
            for event in self._stream:
                attributes = event.get("Actor", {}).get("Attributes", {})
                if event.get("Type") == "volume":
                    if event.get("Actor", {}).get("ID") == self._marker:
                        self._marker_seen.set()
                        return
                elif attributes.get(self.label_key) == self.label_value:
                    self._created.append(attributes.get("name", event.get("id", "")))
        except Exception:  # the stream was closed under us
            return

    def stop(self) -> list[str]:
        """Stop watching; the names of the matching containers created meanwhile."""
        self._close(wait=True)
        return self.created()

    def _close(self, wait: bool) -> None:
        try:
            if wait:
                self._catch_up()
        finally:
            self._stream.close()
            self._client.close()

    def _catch_up(self) -> None:
        """Wait until the engine has delivered every event up to now: a volume created
        now is the marker; the engine sends its event after all earlier ones."""
        volume = self._client.volumes.create(self._marker, labels={_MARKER_LABEL: "1"})
        try:
            if not self._marker_seen.wait(self.timeout):
                raise TimeoutError("the engine's event stream did not catch up")
        finally:
            volume.remove(force=True)

    def created(self) -> list[str]:
        """Names of the matching containers created so far."""
        return list(self._created)

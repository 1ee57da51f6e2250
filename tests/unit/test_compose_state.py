"""Where ``tributary demo --containers`` keeps its state: somewhere the containers' account
can reach at the same path, which a folder in root's home is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from tributary.services.settings import ServiceSettings
from tributary.testbed.compose import (
    SYSTEM_STATE,
    ComposeFederation,
    reachable_in_containers,
    state_folder,
)


def test_state_in_roots_home_moves_out_of_it() -> None:
    settings = ServiceSettings(state_dir=Path("/root/.local/state/tributary"))
    assert state_folder(settings) == SYSTEM_STATE
    assert reachable_in_containers(SYSTEM_STATE)


def test_state_elsewhere_stays_beside_the_other_services(tmp_path: Path) -> None:
    settings = ServiceSettings(state_dir=tmp_path / "state")
    assert state_folder(settings) == (tmp_path / "state" / "compose").resolve()
    assert reachable_in_containers(Path("/home/someone/.local/state/tributary/compose"))


def test_a_federation_refuses_a_folder_the_containers_cannot_reach() -> None:
    with pytest.raises(ValueError, match="cannot reach /root/tributary-demo"):
        ComposeFederation(Path("/root/tributary-demo"), ServiceSettings(), 8000)

from pathlib import Path

import pytest

from tributary.spoke.linkage import Linkage, LinkageExists


def test_tables_are_kept_per_psi_sorted_and_written_once(tmp_path: Path) -> None:
    with Linkage(tmp_path) as linkage:
        linkage.save("psi-1", {"l-b": "c-2", "l-a": "c-1"})
        linkage.save("psi-1", {"l-a": "c-1", "l-b": "c-2"})  # a redelivery: no-op
        with pytest.raises(LinkageExists):
            linkage.save("psi-1", {"l-a": "c-9"})
        linkage.save("psi-2", {})
        assert linkage.cases("psi-1") == [("l-a", "c-1"), ("l-b", "c-2")]
        assert linkage.exists("psi-2") and linkage.load("psi-2") == {}
        assert linkage.load("psi-unknown") == {}
    with Linkage(tmp_path) as reopened:
        assert reopened.load("psi-1") == {"l-a": "c-1", "l-b": "c-2"}
        reopened.forget("psi-1")
        assert not reopened.exists("psi-1") and reopened.load("psi-1") == {}

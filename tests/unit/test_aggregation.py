"""Detection matching on hand-made cases."""

from tributary.hub.services.aggregation import match_findings


def nodule(x: float, d: float) -> dict:
    return {"center_mm": [x, 0.0, 0.0], "diameter_mm": d}


def test_matches_within_radius_only() -> None:
    truth = [nodule(0, 10), nodule(50, 8)]
    found = [nodule(1, 9), nodule(57, 8), nodule(100, 5)]
    pairs, misses, extras = match_findings(found, truth)
    assert [(f["center_mm"][0], t["center_mm"][0]) for f, t in pairs] == [(1, 0)]
    assert misses == 1 and extras == 2


def test_one_detection_cannot_match_two_nodules() -> None:
    truth = [nodule(0, 20), nodule(2, 20)]
    pairs, misses, extras = match_findings([nodule(1, 20)], truth)
    assert len(pairs) == 1 and misses == 1 and extras == 0


def test_empty() -> None:
    assert match_findings([], []) == ([], 0, 0)

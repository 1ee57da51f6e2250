"""Trust made visible, without services: the spoke's trust store (a steward's decisions,
picked up by the running spoke without a restart), the heartbeat's bounded report, the
sandbox grant no ordinary spoke accepts as an approval, and the hub's verdicts per spoke."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlmodel import Session, SQLModel, create_engine

from tributary.hub.models import Algorithm, Experiment, ExperimentTarget, Spoke, SpokeKey
from tributary.hub.services.launch import check_targets
from tributary.hub.services.trust import LaunchRefused, verdict
from tributary.protocol.messages import (
    MAX_REPORTED_PUBLISHERS,
    HeartbeatMessage,
    PublisherTrust,
    RunLimits,
    SiteCapacity,
)
from tributary.protocol.release import (
    is_sandbox_grant,
    sign_approval,
    sign_release,
    sign_sandbox_grant,
    verify_approval,
    verify_sandbox_grant,
)
from tributary.protocol.signing import SignatureError, SigningKey
from tributary.spoke.config import RunnerSettings
from tributary.spoke.runner import limits_refusal, site_capacity
from tributary.spoke.trust import TrustedKeys, TrustError, add, read_store, remove

DIGEST = "sha256:" + "ab" * 32
REPO = "registry.example/tributary/demo"


def test_a_steward_decision_reaches_the_running_spoke_without_a_restart(tmp_path: Path) -> None:
    configured, added = SigningKey.generate(), SigningKey.generate()
    trusted = TrustedKeys(tmp_path, [configured.public])
    assert [k.keyid for k in trusted.current()] == [configured.keyid]
    entry = add(tmp_path, added.public.pem.encode(), "New Lab", "Dr Steward", "reviewed")
    assert entry.keyid == added.keyid and entry.steward == "Dr Steward"
    assert {k.keyid for k in trusted.current()} == {configured.keyid, added.keyid}
    report = trusted.report()
    assert report.required and set(report.keyids) == {configured.keyid, added.keyid}
    with pytest.raises(TrustError, match="already trusted"):
        add(tmp_path, added.public.pem.encode(), "again", "x", "again")
    assert remove(tmp_path, added.keyid[:10]).keyid == added.keyid
    assert [k.keyid for k in trusted.current()] == [configured.keyid]


def test_trust_decisions_need_a_key_and_a_reason_and_a_known_key_id(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="not an Ed25519 public key"):
        add(tmp_path, b"-----BEGIN PUBLIC KEY-----\nnope\n", "x", "s", "r")
    with pytest.raises(TrustError, match="reason"):
        add(tmp_path, SigningKey.generate().public.pem.encode(), "x", "s", "  ")
    with pytest.raises(TrustError, match="no publisher key"):
        remove(tmp_path, "deadbeef")
    assert read_store(tmp_path).publishers == []


def test_a_damaged_store_is_an_error_and_the_running_spoke_keeps_its_last_good_keys(
        tmp_path: Path) -> None:
    key = SigningKey.generate()
    add(tmp_path, key.public.pem.encode(), "Lab", "s", "r")
    trusted = TrustedKeys(tmp_path, [])
    assert [k.keyid for k in trusted.current()] == [key.keyid]
    store = tmp_path / "trusted-publishers.json"
    store.write_text('{"publishers": [{"keyid": 1}]}')
    os.utime(store, ns=(1, 1))
    with pytest.raises(TrustError):
        read_store(tmp_path)
    assert [k.keyid for k in trusted.current()] == [key.keyid]


def test_no_pinned_publisher_is_reported_as_not_required(tmp_path: Path) -> None:
    report = TrustedKeys(tmp_path, [], sandbox=True).report()
    assert not report.required and report.keyids == [] and report.sandbox


def test_the_heartbeats_trust_report_is_bounded_and_optional() -> None:
    base = {"spoke_id": "north", "spoke_version": "1", "concurrency": 1, "queue_depth": 0,
            "interval_seconds": 5}
    assert HeartbeatMessage(**base).trust is None  # an older spoke stays valid
    with pytest.raises(ValidationError):
        PublisherTrust(required=True, keyids=["ab" * 32] * (MAX_REPORTED_PUBLISHERS + 1))
    with pytest.raises(ValidationError, match="not a key id"):
        PublisherTrust(required=True, keyids=["<script>"])


def test_a_sandbox_grant_is_never_an_approval() -> None:
    hub = SigningKey.generate()
    grant = sign_sandbox_grant(hub, REPO, DIGEST, {"developer": "dev"})
    assert is_sandbox_grant(grant)
    with pytest.raises(SignatureError):
        verify_approval(grant, [hub.public], DIGEST)
    assert verify_sandbox_grant(grant, [hub.public], DIGEST)["developer"] == "dev"
    with pytest.raises(SignatureError):
        verify_sandbox_grant(grant, [SigningKey.generate().public], DIGEST)
    approval = sign_approval(hub, REPO, DIGEST, {})
    assert not is_sandbox_grant(approval) and not is_sandbox_grant({"payload": "!!"})


@pytest.fixture
def session() -> Session:
    engine = create_engine("sqlite://")
    SQLModel.metadata.create_all(engine)
    return Session(engine)


def _spoke(session: Session, spoke_id: str, **fields: object) -> Spoke:
    spoke = Spoke(id=spoke_id, name=spoke_id, **fields)
    session.add(spoke)
    session.add(SpokeKey(keyid=f"k-{spoke_id}", spoke_id=spoke_id,
                         public_key_pem=SigningKey.generate().public.pem))
    session.commit()
    return spoke


def test_the_hub_names_why_each_spoke_will_not_run_a_version(session: Session) -> None:
    publisher, hub = SigningKey.generate(), SigningKey.generate()
    algorithm = Algorithm(name="demo", version="1", repository=REPO, digest=DIGEST,
                          publisher="Lab", approval=sign_approval(hub, REPO, DIGEST, {}),
                          release_signature=sign_release(publisher, REPO, DIGEST, "demo", "1",
                                                         "Lab"))
    now = datetime.now(UTC)
    trusting = _spoke(session, "trusting", trust_reported_at=now, trust_required=True,
                      trusted_publishers=[publisher.keyid])
    stranger = _spoke(session, "stranger", trust_reported_at=now, trust_required=True,
                      trusted_publishers=["ab" * 32])
    open_site = _spoke(session, "open", trust_reported_at=now, trust_required=False,
                       trusted_publishers=[])
    silent = _spoke(session, "silent")
    revoked = _spoke(session, "revoked", revoked_at=now)
    sandbox = _spoke(session, "sandbox", sandbox=True, trust_reported_at=now,
                     trust_sandbox=True)
    assert verdict(session, trusting, algorithm).runs
    assert verdict(session, open_site, algorithm).runs
    assert "does not trust Lab" in verdict(session, stranger, algorithm).reason
    assert "never reported" in verdict(session, silent, algorithm).reason
    assert "revoked" in verdict(session, revoked, algorithm).reason
    assert "sandbox studies only" in verdict(session, sandbox, algorithm).reason
    assert verdict(session, sandbox, algorithm, sandbox_study=True).runs
    assert "not a sandbox spoke" in verdict(session, trusting, algorithm,
                                            sandbox_study=True).reason
    algorithm.approval = None
    assert "not approved" in verdict(session, open_site, algorithm).reason


def test_the_launch_check_setting_relaxes_only_the_trust_part(session: Session) -> None:
    hub, publisher = SigningKey.generate(), SigningKey.generate()
    algorithm = Algorithm(name="demo", version="1", repository=REPO, digest=DIGEST,
                          publisher="Lab", approval=sign_approval(hub, REPO, DIGEST, {}),
                          release_signature=sign_release(publisher, REPO, DIGEST, "demo", "1",
                                                         "Lab"))
    session.add(algorithm)
    session.commit()
    now = datetime.now(UTC)
    _spoke(session, "stranger", trust_reported_at=now, trust_required=True,
           trusted_publishers=["ab" * 32])
    _spoke(session, "silent")
    _spoke(session, "sandbox", sandbox=True)

    def refused(spokes: list[str], mode: str) -> list[str]:
        experiment = Experiment(id=f"exp-{mode}-{len(spokes)}", name="x",
                                algorithm_id=algorithm.id or 0)
        session.add(experiment)
        session.flush()
        for spoke_id in spokes:
            session.add(ExperimentTarget(experiment_id=experiment.id, spoke_id=spoke_id))
        session.commit()
        try:
            check_targets(session, experiment, algorithm, mode)
        except LaunchRefused as exc:
            return [v.spoke_id for v in exc.refusals]
        return []

    assert refused(["stranger", "silent"], "strict") == ["silent", "stranger"]
    assert refused(["stranger", "silent"], "reported") == ["stranger"]
    assert refused(["stranger", "silent"], "off") == []
    assert refused(["sandbox"], "off") == ["sandbox"]  # the boundary holds whatever the mode


def test_a_study_asking_for_more_gpus_than_a_spoke_reported_is_refused_at_the_hub(
        session: Session) -> None:
    """The capacity a spoke reports (protocol 1.5) lets the hub refuse, naming why, a study
    the spoke would refuse for its GPUs; the spoke's own rule is the same function."""
    hub = SigningKey.generate()
    algorithm = Algorithm(name="demo", version="1", repository=REPO, digest=DIGEST,
                          approval=sign_approval(hub, REPO, DIGEST, {}))
    session.add(algorithm)
    session.commit()
    now = datetime.now(UTC)

    def capacity(engine: str, gpus: int) -> dict[str, object]:
        return SiteCapacity(engine=engine, max_gpus=gpus, max_tmp_mb=4096,
                            max_timeout_seconds=3600, max_memory_mb=8192,
                            max_cpus=4).model_dump(mode="json")

    open_fields = {"trust_reported_at": now, "trust_required": False, "trusted_publishers": []}
    _spoke(session, "cpu-only", capacity=capacity("docker", 0), **open_fields)
    _spoke(session, "two-gpus", capacity=capacity("docker", 2), **open_fields)
    _spoke(session, "podman", capacity=capacity("podman", 4), **open_fields)
    _spoke(session, "older", **open_fields)  # never reported: it decides on arrival

    def refused(gpus: int) -> dict[str, str]:
        experiment = Experiment(id=f"exp-gpu-{gpus}", name="x", algorithm_id=algorithm.id or 0,
                                limits=RunLimits(gpus=gpus).model_dump(mode="json"))
        session.add(experiment)
        session.flush()
        for spoke_id in ("cpu-only", "two-gpus", "podman", "older"):
            session.add(ExperimentTarget(experiment_id=experiment.id, spoke_id=spoke_id))
        session.commit()
        try:
            check_targets(session, experiment, algorithm, "off")  # no mode relaxes limits
        except LaunchRefused as exc:
            assert "nothing was sent" in exc.detail()["message"]
            return {v.spoke_id: v.reason for v in exc.refusals}
        return {}

    assert refused(0) == {}
    one = refused(1)
    assert set(one) == {"cpu-only", "podman"}
    assert "offers none ([runner] max_gpus = 0)" in one["cpu-only"]
    assert "Podman" in one["podman"]
    assert "at most 2" in refused(3)["two-gpus"]
    # the same rule as the spoke's own admission check
    site = RunnerSettings(max_gpus=2)
    assert limits_refusal(RunLimits(gpus=3), site, "docker") == SiteCapacity(
        engine="docker", max_gpus=2, max_tmp_mb=1, max_timeout_seconds=1, max_memory_mb=1,
        max_cpus=1).refusal(RunLimits(gpus=3))
    assert site_capacity(site, "slurm").max_gpus == 2


def test_a_heartbeat_reports_the_sites_capacity_within_bounds() -> None:
    with pytest.raises(ValidationError):
        SiteCapacity(engine="docker; rm -rf /", max_gpus=0, max_tmp_mb=1,
                     max_timeout_seconds=1, max_memory_mb=1, max_cpus=1)
    with pytest.raises(ValidationError):
        SiteCapacity(engine="docker", max_gpus=10_000, max_tmp_mb=1, max_timeout_seconds=1,
                     max_memory_mb=1, max_cpus=1)

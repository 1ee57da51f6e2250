"""Admission of a journaled experiment, on the dispatcher thread: it has not expired, its
image is approved by the hub, not revoked, released by a trusted publisher and pulled by
digest, and its cohort is one the site's release policy allows. Then its cases are queued
together with the ``accepted`` status; otherwise it is refused with the reason."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import docker.errors

from tributary.protocol.messages import ExperimentMessage, ExperimentState, FailureReason
from tributary.protocol.release import is_sandbox_grant, verify_sandbox_grant
from tributary.protocol.signing import PublicKey, SignatureError
from tributary.spoke import journal as states
from tributary.spoke.cases import Cases
from tributary.spoke.catalog import SelectionRefused, refused_attributes
from tributary.spoke.config import SpokeConfig
from tributary.spoke.engines import engine_client, engine_name
from tributary.spoke.images import (
    ANONYMOUS,
    ImageRefused,
    RegistryAccess,
    check_approval,
    check_release,
    ensure_image,
    verify_served,
)
from tributary.spoke.lifecycle import Lifecycle
from tributary.spoke.runner import limits_refusal
from tributary.spoke.trust import TrustedKeys

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, config: SpokeConfig, lifecycle: Lifecycle, cases: Cases,
                 hub_keys: list[PublicKey], publishers: TrustedKeys,
                 stopping: threading.Event, registry: RegistryAccess = ANONYMOUS) -> None:
        self.config = config
        self.registry = registry
        self.lifecycle = lifecycle
        self.cases = cases
        self.hub_keys = hub_keys
        self.publishers = publishers
        self.stopping = stopping

    def prepare(self, message: ExperimentMessage) -> None:
        """Check the image and select the cases of a journaled experiment; accepted cases
        are queued in the journal together with the ``accepted`` status. Left ``received``
        (tried again) while the container engine is unavailable."""
        experiment_id = message.experiment_id
        log.info("experiment %s: %s", experiment_id, message.algorithm.reference)
        if message.expires_at is not None and message.expires_at < datetime.now(UTC):
            self._refuse(experiment_id, "experiment expired")
            return
        refusal = limits_refusal(message.limits, self.config.runner,
                                 self.config.execution.engine)
        if refusal is not None:
            log.error("refusing %s: %s", experiment_id, refusal)
            self.lifecycle.audit("limits.refused", experiment_id, reason=refusal,
                                 limits=message.limits.model_dump(mode="json"))
            self._refuse(experiment_id, refusal)
            return
        if not self._image_admitted(message):
            return
        try:
            cases = self.cases.select(message)
        except SelectionRefused as exc:
            log.error("refusing %s: %s", experiment_id, exc)
            self.lifecycle.audit("cohort.refused", experiment_id, reason=str(exc),
                                 criteria=message.cohort.model_dump(mode="json"))
            self._refuse(experiment_id, str(exc))
            return
        except Exception as exc:
            log.exception("could not select the cases of %s", experiment_id)
            self._refuse(experiment_id, f"input_error: the cases could not be read: "
                                        f"{type(exc).__name__}")
            return
        ids = list(cases)
        refused = refused_attributes(message.release, self.config.policy.releasable_attributes)
        if refused:
            self.lifecycle.audit("release.refused", experiment_id, attributes=refused,
                                 reason="not releasable under this site's policy")
        if not self.lifecycle.settle(
                experiment_id, states.ACCEPTED, ExperimentState.ACCEPTED, ids,
                reason=f"not releasable under this site's policy, never sent: "
                       f"{', '.join(refused)}" if refused else None,
                queue=ids, expect=states.RECEIVED):
            return  # cancelled while it was being prepared; the hub has been told
        self.lifecycle.maybe_finish(experiment_id)  # no cases at all: completed at once

    def _image_admitted(self, message: ExperimentMessage) -> bool:
        """Whether the experiment's image may run here (pulled and verified by now); False
        if it was refused, or if the container engine is unavailable (after a pause). On
        Slurm the compute nodes pull the image by digest themselves: the spoke checks that
        the registry serves exactly that digest."""
        experiment_id = message.experiment_id
        reference = message.algorithm.reference
        execution = self.config.execution
        docker_client = None
        if execution.engine != "slurm":
            try:
                docker_client = engine_client(execution)
            except docker.errors.DockerException as exc:
                log.error("%s unavailable for %s: %s; will retry", engine_name(execution),
                          experiment_id, exc)
                self.stopping.wait(10)
                return False
        try:
            publishers = self._approved(message)
            revoked = self.lifecycle.journal.revocation(message.algorithm.digest)
            if revoked is not None:
                raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                                   f"approval revoked by the hub: {revoked}")
            check_release(message.algorithm, publishers,
                          self.config.runner.allowed_registries,
                          self.config.trust.registry_signatures, self.registry)
            if docker_client is None:
                image_id = verify_served(message.algorithm,
                                         self.config.runner.allowed_registries, self.registry)
            else:
                image_id = ensure_image(
                    docker_client, message.algorithm, self.config.runner.allowed_registries,
                    on_pull=lambda pulled: self.lifecycle.audit("image.pulled", reference,
                                                                image_id=pulled),
                    access=self.registry)
            self.lifecycle.audit("image.verified", reference, result="verified",
                                 image_id=image_id, experiment=experiment_id)
        except ImageRefused as exc:
            log.error("refusing %s: %s", experiment_id, exc.detail)
            self.lifecycle.audit("image.verified", reference, result="refused",
                                 reason=exc.reason, error=exc.detail, experiment=experiment_id)
            self._refuse(experiment_id, f"{exc.reason}: {exc.detail}")
            return False
        finally:
            if docker_client is not None:
                docker_client.close()
        return True

    def _approved(self, message: ExperimentMessage) -> list[PublicKey]:
        """Check the hub's approval, or on a sandbox spoke its sandbox grant; return the
        publisher keys the release signature must verify with. A spoke that is not a
        sandbox never runs a sandbox grant, whatever the hub sends."""
        ref = message.algorithm
        if not is_sandbox_grant(ref.approval):
            check_approval(ref, self.hub_keys)
            return self.publishers.current()
        if not self.config.trust.sandbox:
            raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                               "not approved: a sandbox grant for an unreviewed version; "
                               "this spoke runs only versions approved under the review rule")
        assert ref.approval is not None
        try:
            grant = verify_sandbox_grant(ref.approval, self.hub_keys, ref.digest)
            publisher = PublicKey.from_pem(str(grant.get("publisher_key_pem", "")))
        except SignatureError as exc:
            raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                               f"sandbox grant: {exc}") from None
        except Exception:  # a grant without a readable key runs nothing
            raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                               "sandbox grant names no readable publisher key") from None
        self.lifecycle.audit("sandbox.granted", ref.reference, actor="hub",
                             developer=grant.get("developer"), publisher=publisher.keyid,
                             experiment=message.experiment_id)
        return [publisher]  # only the developer's own publisher, never anyone else's

    def _refuse(self, experiment_id: str, reason: str) -> None:
        self.lifecycle.settle(experiment_id, states.REFUSED, ExperimentState.REFUSED,
                              reason=reason, expect=states.RECEIVED)

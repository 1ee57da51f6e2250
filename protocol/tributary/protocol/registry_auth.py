"""A spoke's registry password: a short-lived assertion signed with the Ed25519 key the hub
already has enrolled for it, so a spoke holds no registry secret of its own.

The spoke sends it as the password of HTTP Basic authentication (username: its id) to the
hub's registry token service, directly or through the Docker engine's ``auth_config``. The
hub verifies it against the spoke's active enrolled keys
(:mod:`tributary.hub.services.registry_access`). A copy that leaks is useless minutes later.
"""

from __future__ import annotations

import secrets
import time

from tributary.protocol.signing import SigningKey

#: How long an assertion is accepted; the hub refuses longer ones.
ASSERTION_LIFETIME_S = 300
MAX_ASSERTION_LIFETIME_S = 900


def spoke_assertion(key: SigningKey, spoke_id: str, service: str,
                    lifetime_s: int = ASSERTION_LIFETIME_S) -> str:
    """The password a spoke presents to the token service ``service`` (the registry's
    ``service`` name, the assertion's audience)."""
    now = int(time.time())
    return key.sign_jwt({"sub": spoke_id, "aud": service, "iat": now,
                         "exp": now + lifetime_s, "jti": secrets.token_urlsafe(16)})

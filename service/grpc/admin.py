"""The admin token check, transport-neutral: REST passes its Authorization header, gRPC its
`authorization` metadata (tritonclient sends `headers=` as metadata), both as
`Bearer <token>`.

Off without a configured token (403 / PERMISSION_DENIED: nothing to guess), a
missing or wrong token 401 / UNAUTHENTICATED. The comparison takes the same
time whatever the token's first wrong byte.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from bnfold.service.errors import Forbidden, Unauthorized


def check_admin_token(configured: SecretStr | None, authorization: str | None) -> None:
    """Raise unless `authorization` is `Bearer <the configured token>`."""
    if configured is None:
        raise Forbidden(
            "admin endpoints are disabled: start the server with BNFOLD_ADMIN_TOKEN "
            "(or --admin-token) to enable load and unload"
        )
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized(
            "this admin call needs 'authorization: Bearer <token>' (an HTTP header, or "
            "gRPC metadata)"
        )
    if not hmac.compare_digest(
        credentials.strip().encode(), configured.get_secret_value().encode()
    ):
        raise Unauthorized("wrong admin token")

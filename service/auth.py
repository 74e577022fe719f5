"""The bearer-key check, one for both protocols (HTTP `Authorization` header, gRPC `authorization` metadata)."""
from __future__ import annotations

import secrets

from service.errors import Unauthorized


def check_bearer(authorization: str | None, key: str | None, where: str = "`Authorization: Bearer <key>`",
                 what: str = "API key") -> None:
    """Pass when no key is configured or `authorization` is `Bearer <key>`; else raise Unauthorized."""
    if key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized(f"missing or wrong {what}; send {where}")

"""Signing payloads, so a worker unpickles only what a holder of the key enqueued.

Unpickling runs code: anyone who can write to the queue's store can make a
worker run anything. With a secret key, the queue signs each task's payload
(HMAC-SHA256 over the function and argument blobs) and the worker refuses,
and marks failed, every task whose signature is missing or wrong, before
unpickling it. The key comes from the ``secret_key`` argument or the
``SITQ_SECRET_KEY`` environment variable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Optional, Union

from sitq.errors import InvalidTaskError, SignatureError

__all__ = ["Signer", "signer_from"]

ENVIRONMENT_VARIABLE = "SITQ_SECRET_KEY"


class Signer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise InvalidTaskError("a secret key for signing must be at least 16 bytes long")
        self._key = key

    def __repr__(self) -> str:
        return "<Signer (key hidden)>"

    def sign(self, func: bytes, args: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        mac.update(len(func).to_bytes(8, "big"))
        mac.update(func)
        mac.update(args)
        return mac.digest()

    def verify(self, func: bytes, args: bytes, signature: Optional[bytes]) -> None:
        if signature is None:
            raise SignatureError(
                "refused to unpickle this task: it is not signed, and this worker only runs signed "
                f"tasks; enqueue it with the same secret_key (or {ENVIRONMENT_VARIABLE})"
            )
        if not hmac.compare_digest(self.sign(func, args), signature):
            raise SignatureError(
                "refused to unpickle this task: its signature does not match its payload; it was "
                "changed after it was enqueued, or signed with another key"
            )


def signer_from(secret_key: Union[str, bytes, None]) -> Optional[Signer]:
    """The signer for an explicit key, else for ``SITQ_SECRET_KEY``, else None (no signing)."""
    if secret_key is None:
        secret_key = os.environ.get(ENVIRONMENT_VARIABLE) or None
    if secret_key is None:
        return None
    if isinstance(secret_key, str):
        secret_key = secret_key.encode()
    if not isinstance(secret_key, bytes):
        raise InvalidTaskError(f"secret_key must be str or bytes, not {type(secret_key).__name__}")
    return Signer(secret_key)

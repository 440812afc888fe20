"""Signing what sitq stores, so nothing is unpickled that a holder of the key did not write.

Unpickling runs code: anyone who can write to the queue's store could make a
worker, or the process that reads a result, run anything. With a secret key
(the ``secret_key`` argument, or the ``SITQ_SECRET_KEY`` environment variable)
every pickle sitq stores is signed with HMAC-SHA256 and checked before it is
unpickled:

- a task's payload (function and argument blobs), signed by the queue and
  checked by the worker;
- a task's return value, signed by the worker and checked by
  ``deserialize_result`` (and everything built on it);
- a schedule's payload, signed by the queue that declares it for the
  schedule's name and checked by the worker that enqueues a tick, which then
  signs the tick's task as a queue would.

Each signature covers the task id and says what it signs (a payload or a
value), so a payload or value copied into another row, or a value passed off
as a payload, does not verify. A store that has been used with a key records
the key's fingerprint (an HMAC of a fixed label, never the key), so a worker
or queue without the key, or with another key, refuses it at once instead of
running or reading what it cannot check. ``docs/explanation/trust-model.md``
says what this protects and what it does not.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from sitq.errors import InvalidTaskError, SignatureError

__all__ = ["Signer", "signer_from", "check_store_key", "ENVIRONMENT_VARIABLE", "HOW_TO_SUPPLY", "STORE_KEY_RECORD"]

ENVIRONMENT_VARIABLE = "SITQ_SECRET_KEY"
HOW_TO_SUPPLY = f"pass secret_key=... or set the {ENVIRONMENT_VARIABLE} environment variable"
STORE_KEY_RECORD = "signing_key_fingerprint"  # the store's meta key for the fingerprint

# What each kind of signature signs; no label is a prefix of another.
_TASK = b"sitq task payload\x00"
_VALUE = b"sitq task value\x00"
_SCHEDULE = b"sitq schedule payload\x00"
_FINGERPRINT = b"sitq key fingerprint\x00"


class Signer:
    """Signs and checks what sitq stores, with one secret key (never shown)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise InvalidTaskError("a secret key for signing must be at least 16 bytes long")
        self._key = key

    def __repr__(self) -> str:
        return "<Signer (key hidden)>"

    def _mac(self, label: bytes, task_id: str, *blobs: bytes) -> bytes:
        """HMAC of the label, the task id and the blobs; each part but the last carries its
        length, so no two different sequences of parts sign the same bytes."""
        mac = hmac.new(self._key, label, hashlib.sha256)
        *framed, last = (task_id.encode("utf-8", "surrogatepass"), *blobs)
        for part in framed:
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        mac.update(last)
        return mac.digest()

    @property
    def fingerprint(self) -> str:
        """What a store records about its key: it tells keys apart and reveals nothing of them."""
        return "hmac-sha256:" + hmac.new(self._key, _FINGERPRINT, hashlib.sha256).hexdigest()

    def sign_task(self, task_id: str, func: bytes, args: bytes) -> bytes:
        """The signature of a task's payload (function and argument bytes), bound to its id."""
        return self._mac(_TASK, task_id, func, args)

    def sign_value(self, task_id: str, value: bytes) -> bytes:
        """The signature of a task's pickled return value, bound to its id."""
        return self._mac(_VALUE, task_id, value)

    def sign_schedule(self, name: str, func: bytes, args: bytes) -> bytes:
        """The signature of a schedule's payload, bound to its name."""
        return self._mac(_SCHEDULE, name, func, args)

    def verify_schedule(self, name: str, func: bytes, args: bytes, signature: bytes | None) -> None:
        """Raise :class:`SignatureError` unless ``signature`` signs this payload for the schedule ``name``."""
        if not _equal(self.sign_schedule(name, func, args), signature):
            what = "is not signed" if signature is None else "has a signature that does not match its payload and name"
            raise SignatureError(
                f"refused to enqueue a tick of schedule {name!r}: its payload {what}; declare it again with "
                f"the store's secret key ({HOW_TO_SUPPLY})"
            )

    def verify_task(self, task_id: str, func: bytes, args: bytes, signature: bytes | None) -> None:
        """Raise :class:`SignatureError` unless ``signature`` signs this payload for this task."""
        if signature is None:
            raise SignatureError(
                "refused to unpickle this task: it is not signed, and this worker only runs signed "
                f"tasks; enqueue it with the same secret_key (or {ENVIRONMENT_VARIABLE})"
            )
        if not _equal(self.sign_task(task_id, func, args), signature):
            raise SignatureError(
                "refused to unpickle this task: its signature does not match its payload and task id; "
                "the payload was changed or copied from another task after it was enqueued, or it "
                "was signed with another key"
            )

    def verify_value(self, task_id: str, name: str, value: bytes, signature: bytes | None) -> None:
        """Raise :class:`SignatureError` unless ``signature`` signs this value for this task."""
        if signature is None:
            raise SignatureError(
                f"refused to unpickle the value of task {task_id} ({name}): it is not signed, and "
                "with a secret key sitq only unpickles signed values; it was stored by a worker "
                "without the key, or before the store was first used with one. Run the task again "
                "on a worker that has the key."
            )
        if not _equal(self.sign_value(task_id, value), signature):
            raise SignatureError(
                f"refused to unpickle the value of task {task_id} ({name}): its signature does not "
                "match the value and task id; the value was changed or copied from another task in "
                "the store, or it was signed with another key"
            )


def _equal(expected: bytes, signature: object) -> bool:
    return isinstance(signature, bytes) and hmac.compare_digest(expected, signature)


def signer_from(secret_key: str | bytes | None) -> Signer | None:
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


def check_store_key(signer: Signer | None, recorded: str | None, store: str, who: str) -> None:
    """Raise :class:`SignatureError` if ``who`` (``"this worker"``, ``"this queue"``) may not use
    the store: it has no key for a store that records one, or a key other than the recorded one.

    ``recorded`` is the fingerprint the store holds, None if it was never used with a key.
    """
    if recorded is None:
        return
    if signer is None:
        raise SignatureError(
            f"the store {store} is set up for signed tasks (it was first used with a secret key), "
            f"and {who} has no key, so it could not check what it unpickles; give it the key the "
            f"store's other workers and queues use: {HOW_TO_SUPPLY}"
        )
    if not hmac.compare_digest(signer.fingerprint.encode(), str(recorded).encode("utf-8", "replace")):
        raise SignatureError(
            f"the secret key of {who} does not match the one the store {store} was set up with; "
            f"give it the key the store's other workers and queues use: {HOW_TO_SUPPLY}"
        )

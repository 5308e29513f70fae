"""The registry's promotion lock: mutual exclusion for moves of an alias, across processes and hosts.

MLflow has no conditional alias update, so :mod:`tasks.registry` moves ``champion`` only inside a
:class:`RegistryLock` — a registered model ``<NAME>.lock`` whose creation is atomic through the tracking
server's database (unique model name). A general lock over the MLflow registry, kept apart from the
gate's policy that uses it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import socket
import time
import uuid

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LOCK_STALE_S",
    "LOCK_SUFFIX",
    "RegistryLock",
    "RegistryLockLost",
    "RegistryLockTimeout",
    "already_exists",
    "is_missing",
]

LOCK_SUFFIX = ".lock"
# A crashed gate leaves its lock behind; after this many seconds another gate breaks it. A live gate holds
# the lock for a few requests (well under a second on a local server).
DEFAULT_LOCK_STALE_S = 300.0


def is_missing(exc: MlflowException) -> bool:
    """The server said the entity does not exist."""
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def already_exists(exc: MlflowException) -> bool:
    """The server refused a create because the name is taken (how a lost race reads)."""
    return exc.error_code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


class RegistryLockTimeout(TimeoutError):
    """Another gate held the promotion lock for longer than the wait allowed (and it was not stale)."""


class RegistryLockLost(RuntimeError):
    """Our lock was broken as stale by another gate before we wrote: nothing is written (fail-closed)."""


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


class RegistryLock:
    """Mutual exclusion for moves of ``champion`` on registered model ``name``, across processes/hosts.

    Acquire = create the registered model ``<name>.lock``; the tracking server's database rejects a second
    model of that name (unique key), so exactly one creator wins. Release = delete it (only when the
    ``lock.owner`` tag is still ours). The holder's wall-clock acquisition time is the ``lock.acquired_at``
    tag: a lock older than ``stale_after`` seconds (default ``$SPF_REGISTRY_LOCK_STALE_S`` or 300; by
    that tag, or by how long this waiter has seen the same owner hold it) belongs to a crashed holder and is
    broken — through a second create-once model ``<name>.lock.broken-<id>`` (kept as the audit record), so
    two waiters can never both break it and delete each other's fresh lock. A waiter gives up after
    ``timeout`` seconds (default ``$SPF_REGISTRY_LOCK_TIMEOUT_S`` or stale_after + 60) with
    :class:`RegistryLockTimeout`. Assumes the clocks of the hosts running gates agree to well under
    ``stale_after`` (NTP).
    """

    def __init__(
        self,
        client: MlflowClient,
        name: str,
        *,
        stale_after: float | None = None,
        timeout: float | None = None,
        poll: float = 0.2,
    ) -> None:
        self.client = client
        self.name = name
        self.lock_name = f"{name}{LOCK_SUFFIX}"
        self.stale_after = stale_after or _env_seconds("SPF_REGISTRY_LOCK_STALE_S", DEFAULT_LOCK_STALE_S)
        self.timeout = timeout or _env_seconds("SPF_REGISTRY_LOCK_TIMEOUT_S", self.stale_after + 60.0)
        self.poll = poll
        self.token = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex}"
        self.held = False
        self.waited_s = 0.0

    # ------------------------------------------------------------------------------------------ state
    def _holder(self) -> dict[str, str] | None:
        try:
            return dict(self.client.get_registered_model(self.lock_name).tags or {})
        except MlflowException as exc:
            if is_missing(exc):
                return None
            raise

    def owned(self) -> bool:
        """Whether the lock model exists and names us as owner (re-read from the server)."""
        holder = self._holder()
        return holder is not None and holder.get("lock.owner") == self.token

    # ---------------------------------------------------------------------------------------- acquire
    def acquire(self) -> RegistryLock:
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        seen: tuple[str, float] | None = None  # (owner, monotonic time first seen holding the lock)
        while not self._try_create():
            holder = self._holder()
            if holder is None:
                continue  # released between our create and our read: try again at once
            owner = holder.get("lock.owner", "?")
            if owner == self.token:  # our create went through, but its response was lost and retried
                self.held = True
                break
            now = time.monotonic()
            if seen is None or seen[0] != owner:
                seen = (owner, now)
            try:
                age = time.time() - float(holder.get("lock.acquired_at", "nan"))
            except ValueError:
                age = math.nan
            held_for = max(age if math.isfinite(age) else 0.0, now - seen[1])
            if held_for > self.stale_after:
                self._break(owner, holder.get("lock.acquired_at", "?"), held_for)
            elif now >= deadline:
                raise RegistryLockTimeout(
                    f"promotion lock {self.lock_name!r} held by {owner} for {held_for:.0f} s; "
                    f"gave up after {self.timeout:.0f} s (stale after {self.stale_after:.0f} s)"
                )
            time.sleep(self.poll * (0.5 + random.random()))
        self.waited_s = time.monotonic() - t0
        logger.debug("acquired %s (waited %.2f s)", self.lock_name, self.waited_s)
        return self

    def _try_create(self) -> bool:
        try:
            self.client.create_registered_model(
                self.lock_name,
                tags={
                    "lock.owner": self.token,
                    "lock.acquired_at": f"{time.time():.3f}",
                    "lock.for": self.name,
                },
                description=f"promotion lock of {self.name} (tasks/registry_lock.py RegistryLock); "
                "delete it only if no gate is running",
            )
        except MlflowException as exc:
            # "not found" is a lost race too: the server answers a create of a taken name by reading the
            # existing model (MLflow's SqlAlchemyStore.create_registered_model, on IntegrityError), and
            # the holder may delete it in between. Seen under load; the caller then simply tries again.
            if not (already_exists(exc) or is_missing(exc)):
                raise
            return False
        self.held = True
        return True

    def _break(self, owner: str, acquired_at: str, held_for: float) -> None:
        """Delete a stale lock — only the one waiter whose create of the per-holder breaker model wins."""
        breaker = (
            f"{self.lock_name}.broken-{hashlib.sha256(f'{owner}|{acquired_at}'.encode()).hexdigest()[:16]}"
        )
        try:
            self.client.create_registered_model(
                breaker,
                tags={
                    "lock.broken_owner": owner,
                    "lock.broken_by": self.token,
                    "lock.held_for": f"{held_for:.0f}",
                },
                description=f"record of a stale promotion lock of {self.name} broken after {held_for:.0f} s",
            )
        except MlflowException as exc:
            if not already_exists(exc):
                raise
            return  # another waiter is breaking it
        holder = self._holder()
        if holder is not None and holder.get("lock.owner") == owner:
            logger.warning(
                "breaking stale promotion lock %s held by %s for %.0f s", self.lock_name, owner, held_for
            )
            self._delete()

    # ---------------------------------------------------------------------------------------- release
    def _delete(self) -> None:
        try:
            self.client.delete_registered_model(self.lock_name)
        except MlflowException as exc:
            if not is_missing(exc):
                raise

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.owned():
            self._delete()
        else:
            logger.warning(
                "promotion lock %s was no longer ours at release (broken as stale)", self.lock_name
            )

    def __enter__(self) -> RegistryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except Exception:
            # the lock then goes stale and is broken by the next gate; do not mask the original error
            logger.exception("could not release promotion lock %s", self.lock_name)

"""Concurrent promotions against a real MLflow server of this module's own (free port, own SQLite).

Two gates finishing at once must leave exactly one ``champion`` — the one spf.pipeline.gate.decide picks — with
both decisions recorded. MLflow has no conditional alias update; tasks.registry.RegistryLock (a registered
model ``<name>.lock`` created once, through the server database's unique key) serialises the gates. The
race window is widened artificially: every gate sleeps after reading the champion (in ``decide``) and
again before moving the alias (a slow client).
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("mlflow")  # the optional [pipeline] stack: a core-only install skips this file

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from spf.pipeline.gate import GateThresholds
from tasks import registry, tracking
from tests.services import Services

pytestmark = pytest.mark.slow  # starts an MLflow server (~10-30 s)

ROUNDS = 10
DELAY = 0.4  # seconds between a gate's read of the champion and its alias write

BASE = {"harmful_rate": 0.08, "overrefusal_rate": 0.10, "utility": 0.70}
# Each beats BASE. B beats A; A against B regresses harmful_rate by 0.04 > the 0.02 margin. So in any
# serial order the rule ends with B: (A, then B over A) or (B, then A rejected against B).
A = {"harmful_rate": 0.06, "overrefusal_rate": 0.10, "utility": 0.72}
B = {"harmful_rate": 0.02, "overrefusal_rate": 0.05, "utility": 0.80}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    services = Services(tmp_path_factory.mktemp("race-services"), ("mlflow",))  # registry only: no S3
    try:
        services.start()
        yield services.urls["MLFLOW_TRACKING_URI"]
    finally:
        services.stop()


@pytest.fixture(scope="module")
def run_id(server: str) -> str:
    client = tracking.make_client(server)
    return tracking.start_run(client, "spf-race", "candidates", {})


class SlowWrites(MlflowClient):
    """A client that waits before moving ``champion``: a slow network between decision and write."""

    def __init__(self, uri: str, delay: float) -> None:
        super().__init__(tracking_uri=uri, registry_uri=uri)
        self.delay = delay

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        if alias == registry.CHAMPION:
            time.sleep(self.delay)
        super().set_registered_model_alias(name, alias, version)


def _setup_round(client: MlflowClient, run_id: str, tmp: Path) -> tuple[str, str, str, str]:
    name = f"spf-race-{uuid.uuid4().hex[:8]}"
    v0 = registry.register_candidate(client, name, f"runs:/{run_id}/base", run_id, BASE)
    assert registry.apply_gate(client, name, v0, GateThresholds(), tmp / "v0").promote
    va = registry.register_candidate(client, name, f"runs:/{run_id}/a", run_id, A)
    vb = registry.register_candidate(client, name, f"runs:/{run_id}/b", run_id, B)
    return name, v0, va, vb


_local = threading.local()


@pytest.fixture(autouse=True)
def slow_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    """``decide`` runs between the gate's read of the champion and its write: sleep there per thread."""
    real = registry.decide

    def slow(*args, **kwargs):
        time.sleep(getattr(_local, "decide_delay", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "decide", slow)


def _race(
    server: str, name: str, jobs: dict[str, tuple[float, float, float]], tmp: Path, lock: bool
) -> dict[str, object]:
    """Gate each version in ``jobs`` (version → (start offset, decide delay, write delay)) in its own
    thread, all released together from a barrier (then each waits its start offset)."""
    barrier = threading.Barrier(len(jobs))
    out: dict[str, object] = {}

    def gate(version: str, delays: tuple[float, float, float]) -> None:
        client = SlowWrites(server, delays[2])
        _local.decide_delay = delays[1]
        barrier.wait()
        time.sleep(delays[0])
        try:
            out[version] = registry.apply_gate(
                client, name, version, GateThresholds(), tmp / f"gate-{version}", lock=lock
            )
        except Exception as exc:  # surfaced by the assertions below
            out[version] = exc

    threads = [threading.Thread(target=gate, args=(v, d)) for v, d in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def _lock_exists(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(f"{name}{registry.LOCK_SUFFIX}")
        return True
    except MlflowException:
        return False


def test_concurrent_gates_leave_exactly_the_rules_champion(server: str, run_id: str, tmp_path: Path):
    client = tracking.make_client(server)
    orders, walls = [], []
    for i in range(ROUNDS):
        name, v0, va, vb = _setup_round(client, run_id, tmp_path / f"r{i}")
        # alternate which gate starts first (by 50 ms, well inside the other's critical section) and
        # which is slower, so both serial orders occur
        first, second = (0.0, DELAY, DELAY), (0.05, DELAY / 4, DELAY / 4)
        delays = {va: first, vb: second} if i % 2 else {va: second, vb: first}
        t0 = time.perf_counter()
        out = _race(server, name, delays, tmp_path / f"r{i}", lock=True)
        wall = time.perf_counter() - t0
        assert not any(isinstance(d, Exception) for d in out.values()), out
        walls.append(wall)

        champion = registry.champion_version(client, name)[0]
        assert champion == vb, f"round {i}: champion v{champion}, the rule picks v{vb}"
        # both decisions are recorded on their versions, and they form a serial history
        tags = {v: client.get_model_version(name, v).tags for v in (va, vb)}
        assert {tags[va]["gate.decision"], tags[vb]["gate.decision"]} <= {"promoted", "rejected"}
        history = (
            (tags[va]["gate.decision"], tags[va]["gate.champion_before"]),
            (tags[vb]["gate.decision"], tags[vb]["gate.champion_before"]),
        )
        a_first = (("promoted", v0), ("promoted", va))  # A over the base, then B over A
        b_first = (("rejected", vb), ("promoted", v0))  # B over the base, then A rejected against B
        assert history in (a_first, b_first), f"round {i}: not a serial history: {history}"
        orders.append("A,B" if history == a_first else "B,A")
        # serialised: the two critical sections (each ≥ its decide delay) did not overlap
        assert wall >= DELAY + DELAY / 4
        assert not _lock_exists(client, name)  # released
    assert set(orders) == {"A,B", "B,A"}, orders  # both interleavings were exercised
    print(f"{ROUNDS} rounds: orders {orders}; wall per round {min(walls):.2f}-{max(walls):.2f} s")


def test_without_the_lock_the_race_loses_an_update(server: str, run_id: str, tmp_path: Path):
    """Demonstration: unlocked, both gates judge against the base and the slower write wins — the worse
    candidate A ends as champion although the rule (A vs B) would reject it. The compare-and-set re-read
    right before the write cannot see a write that lands after it."""
    client = tracking.make_client(server)
    name, v0, va, vb = _setup_round(client, run_id, tmp_path)
    out = _race(server, name, {va: (0.0, 0.0, DELAY), vb: (0.0, 0.0, DELAY / 4)}, tmp_path, lock=False)
    assert all(d.promote and d.champion_version == v0 for d in out.values())  # type: ignore[union-attr]
    assert registry.champion_version(client, name)[0] == va  # B's promotion was lost


def test_stale_lock_of_a_crashed_gate_is_broken(server: str, run_id: str, tmp_path: Path):
    client = tracking.make_client(server)
    name, _v0, _va, vb = _setup_round(client, run_id, tmp_path)
    lock_name = f"{name}{registry.LOCK_SUFFIX}"
    # a gate that crashed 20 minutes ago while holding the lock
    client.create_registered_model(
        lock_name, tags={"lock.owner": "crashed-host/1/x", "lock.acquired_at": f"{time.time() - 1200:.3f}"}
    )
    t0 = time.perf_counter()
    decision = registry.apply_gate(client, name, vb, GateThresholds(), tmp_path / "g")
    assert decision.promote and registry.champion_version(client, name)[0] == vb
    assert time.perf_counter() - t0 < 30
    assert not _lock_exists(client, name)
    # the break is recorded once, and a second waiter for the same stale lock would not break it again
    broken = [m.name for m in client.search_registered_models(f"name LIKE '{lock_name}.broken-%'")]
    assert len(broken) == 1
    assert client.get_registered_model(broken[0]).tags["lock.broken_owner"] == "crashed-host/1/x"


def test_a_live_lock_makes_the_waiter_time_out_without_touching_champion(
    server: str, run_id: str, tmp_path: Path
):
    client = tracking.make_client(server)
    name, v0, _va, vb = _setup_round(client, run_id, tmp_path)
    holder = registry.RegistryLock(client, name, stale_after=600).acquire()
    try:
        waiter = registry.RegistryLock(client, name, stale_after=600, timeout=1.5)
        with pytest.raises(registry.RegistryLockTimeout, match="held by"):
            registry.apply_gate(client, name, vb, GateThresholds(), tmp_path / "g", lock=waiter)
        assert registry.champion_version(client, name)[0] == v0
        assert "gate.decision" not in client.get_model_version(name, vb).tags
    finally:
        holder.release()
    assert not _lock_exists(client, name)


def test_rollback_keeps_a_newer_promotion(server: str, run_id: str, tmp_path: Path):
    """A rollback for A (a later step of A's run failed) after B was promoted over A leaves B."""
    client = tracking.make_client(server)
    name, v0, va, vb = _setup_round(client, run_id, tmp_path)
    assert registry.apply_gate(client, name, va, GateThresholds(), tmp_path / "a").promote
    assert registry.apply_gate(client, name, vb, GateThresholds(), tmp_path / "b").promote
    registry.rollback_champion(client, name, v0, promoted_version=va)
    assert registry.champion_version(client, name)[0] == vb
    registry.rollback_champion(client, name, va, promoted_version=vb)
    assert registry.champion_version(client, name)[0] == va


def test_a_create_answered_not_found_is_a_lost_race_not_an_error() -> None:
    """MLflow answers a create of a taken name by reading the existing model; when its holder deletes it in
    between, the create fails RESOURCE_DOES_NOT_EXIST. The waiter must try again, not fail the gate (seen
    once under load: `…lock not found` from one of two racing gates)."""
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from tasks.registry_lock import RegistryLock

    class Racing:
        """A registry where the first create races a release; afterwards the name is free."""

        def __init__(self) -> None:
            self.creates = 0
            self.models: dict[str, dict[str, str]] = {}

        def create_registered_model(self, name, tags=None, description=None):
            self.creates += 1
            if self.creates == 1:
                raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
            self.models[name] = dict(tags or {})

        def get_registered_model(self, name):
            if name not in self.models:
                raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
            return type("RM", (), {"tags": self.models[name]})()

        def delete_registered_model(self, name):
            self.models.pop(name)

    client = Racing()
    with RegistryLock(client, "m", poll=0.01, timeout=5) as lock:  # type: ignore[arg-type]
        assert lock.held and client.creates == 2 and "m.lock" in client.models
    assert "m.lock" not in client.models

"""The lifecycle's verbs on a real valkey-server: each transition is one atomic, fenced step."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import StaleFence
from orchestrator.keys import RECORD_TTL_SECONDS, Keys
from orchestrator.lifecycle import DISPATCH_GRACE_SECONDS, AdmitParams, Lifecycle
from orchestrator.states import State
from orchestrator.testing.cluster import Valkey

K = Keys("orch:")
PARAMS = AdmitParams(lease_seconds=30, slot_lease_seconds=60, slot_limit=2, hard=True, max_recoveries=2)


def record(task_id: str = "t-1", priority: int = 5) -> dict[str, Any]:
    return {"task_id": task_id, "state": "queued", "priority": priority, "spec": {"task_id": task_id},
            "started_at": None, "recoveries": 0, "window_start": None, "branch": None}


@pytest.fixture
def r(valkey: Valkey) -> Iterator[redis.Redis]:
    with valkey.client(2) as client:
        yield client


@pytest.fixture
def life(r: redis.Redis) -> Lifecycle:
    return Lifecycle(r, K, PARAMS)


def state_of(r: redis.Redis, agent_id: str) -> str:
    return str(json.loads(r.hget(K.agent(agent_id), "state") or "null"))


def indexes(r: redis.Redis, agent_id: str) -> set[str]:
    found = {name for name, key in (("heartbeats", K.heartbeats), ("deadlines", K.deadlines), ("slots", K.slots),
                                    ("waiting", K.waiting), ("held", K.held), ("dispatch", K.dispatch))
             if r.zscore(key, agent_id) is not None}
    if r.sismember(K.agents_active, agent_id):
        found.add("active")
    return found


def admit(life: Lifecycle, agent_id: str, holder: str = "w1") -> Any:
    return life.admit(agent_id, holder, holder, priority=5, duration_seconds=600)


def test_create_is_idempotent_per_task_id_and_dispatches(life: Lifecycle, r: redis.Redis) -> None:
    agent_id, created, score = life.create(record(), "t-1")
    assert created and state_of(r, agent_id) == "queued"
    assert indexes(r, agent_id) == {"active", "dispatch"} and r.zscore(K.dispatch, agent_id) == score
    again, created_again, _ = life.create(record(), "t-1")
    assert (again, created_again) == (agent_id, False)
    life.dispatched(agent_id, score)
    assert indexes(r, agent_id) == {"active"}


def test_a_task_id_whose_record_is_gone_is_free_again(life: Lifecycle, r: redis.Redis) -> None:
    agent_id, _, _ = life.create(record(), "t-1")
    life.finish(agent_id, "t-1", State.COMPLETED, {"result": {}})
    assert r.ttl(K.task_index("t-1")) > RECORD_TTL_SECONDS - 10  # expires with the record...
    r.delete(K.agent(agent_id))  # ... and if the record goes first, the index no longer answers
    fresh, created, _ = life.create(record(), "t-1")
    assert created and fresh != agent_id


def test_admit_runs_one_delivery_and_parks_the_rest(life: Lifecycle, r: redis.Redis) -> None:
    ids = [life.create(record(f"t-{i}"), f"t-{i}")[0] for i in range(3)]
    first = admit(life, ids[0])
    assert first.outcome == "started" and first.fence.startswith("1:")
    assert indexes(r, ids[0]) == {"active", "heartbeats", "deadlines", "slots"}
    assert admit(life, ids[0], "w2").outcome == "busy"  # a second delivery of the same agent does nothing
    assert admit(life, ids[1]).outcome == "started"
    parked = admit(life, ids[2])  # slot limit 2
    assert parked.outcome == "waiting" and indexes(r, ids[2]) == {"active", "waiting"}
    assert state_of(r, ids[2]) == "queued"
    life.finish(ids[0], "t-0", State.COMPLETED, {"result": {}}, fence=first.fence)
    woken = life.wake()
    assert [a for a, _ in woken] == [ids[2]] and indexes(r, ids[2]) == {"active", "dispatch"}
    assert admit(life, ids[2]).outcome == "started"


def test_slots_are_leases(life: Lifecycle, r: redis.Redis) -> None:
    clock = [1_800_000_000.0]
    timed = Lifecycle(r, K, PARAMS, clock=lambda: clock[0])
    ids = [timed.create(record(f"t-{i}"), f"t-{i}")[0] for i in range(3)]
    assert [admit(timed, a).outcome for a in ids] == ["started", "started", "waiting"]
    clock[0] += PARAMS.slot_lease_seconds + 1  # two dead workers' slots lapse by themselves
    r.delete(K.lease(ids[0]), K.lease(ids[1]))
    assert admit(timed, ids[2]).outcome == "started"


def test_killswitch_holds_at_admission_and_release_dispatches(life: Lifecycle, r: redis.Redis) -> None:
    agent_id, _, _ = life.create(record(), "t-1")
    r.hset(K.killswitch, "engaged", "1")
    assert admit(life, agent_id).outcome == "held"
    assert state_of(r, agent_id) == "held" and indexes(r, agent_id) == {"active", "held"}
    assert life.release_held(agent_id) is not None
    assert state_of(r, agent_id) == "queued" and indexes(r, agent_id) == {"active", "dispatch"}
    assert life.release_held(agent_id) is None  # only once


def test_stop_before_start_and_give_up_keep_a_dispatch_entry_until_finished(life: Lifecycle, r: redis.Redis) -> None:
    agent_id, _, _ = life.create(record(), "t-1")
    r.set(K.stop_request(agent_id), json.dumps({"reason": "no", "status": "killed"}))
    adm = admit(life, agent_id)
    assert adm.outcome == "stop" and "dispatch" in indexes(r, agent_id)  # a dead caller leaves it to the sweep
    life.finish(agent_id, "t-1", State.KILLED, {"result": {}}, fence=adm.fence)
    assert indexes(r, agent_id) == set() and not r.exists(K.stop_request(agent_id))


def test_finish_clears_every_index_and_gives_every_key_the_record_ttl(life: Lifecycle, r: redis.Redis) -> None:
    agent_id, _, _ = life.create(record(), "t-1")
    adm = admit(life, agent_id)
    life.save(agent_id, adm.fence, {"messages": []}, turns=1)
    r.set(K.agent_ledger(agent_id), "10|0")
    done = life.finish(agent_id, "t-1", State.COMPLETED, {"result": {"status": "completed"}}, fence=adm.fence,
                       outbox=(agent_id, K.outbox_item(agent_id), "{}"))
    assert done == 1 and state_of(r, agent_id) == "completed"
    assert indexes(r, agent_id) == set() and not r.exists(K.lease(agent_id))
    for key in (K.agent(agent_id), K.fence(agent_id), K.checkpoint(agent_id), K.task_index("t-1"),
                K.agent_ledger(agent_id), K.events(agent_id), K.outbox_item(agent_id)):
        assert 0 < r.ttl(key) <= RECORD_TTL_SECONDS, key
    assert r.zscore(K.outbox, agent_id) is not None
    assert r.hget(K.stats, "finished:completed") == "1"
    assert life.finish(agent_id, "t-1", State.FAILED, {}, fence=adm.fence) == 2  # once only


def test_unfenced_finish_never_overrules_a_running_agent(life: Lifecycle, r: redis.Redis) -> None:
    agent_id, _, _ = life.create(record(), "t-1")
    admit(life, agent_id)
    assert life.finish(agent_id, "t-1", State.KILLED, {}) == -1
    assert state_of(r, agent_id) == "running"


def test_recover_is_exclusive_and_fences_the_old_run_out(life: Lifecycle, r: redis.Redis) -> None:
    agent_id, _, _ = life.create(record(), "t-1")
    adm = admit(life, agent_id)
    now = time.time()
    assert life.recover(agent_id, now - 60, "dead")[0] == 0  # heartbeat fresh
    r.zadd(K.heartbeats, {agent_id: now - 120})
    done, left_ms, _ = life.recover(agent_id, now - 60, "dead")
    assert done == -1 and left_ms > 0  # its lease still runs: not presumed dead yet
    r.delete(K.lease(agent_id))
    r.zadd(K.heartbeats, {agent_id: now - 120})
    assert life.recover(agent_id, now - 60, "dead")[:2] == (1, 1)
    assert life.recover(agent_id, now - 60, "dead")[0] == 0  # a second sweeper finds nothing
    assert state_of(r, agent_id) == "recovering" and indexes(r, agent_id) == {"active", "dispatch"}
    with pytest.raises(StaleFence):
        life.save(agent_id, adm.fence, turns=99)
    assert not life.beat(agent_id, "w1", adm.fence).owned
    assert r.hget(K.stats, "recoveries") == "1"


def test_hand_back_is_not_a_recovery(life: Lifecycle, r: redis.Redis) -> None:
    agent_id, _, _ = life.create(record(), "t-1")
    adm = admit(life, agent_id)
    life.hand_back(agent_id, "w1", adm.fence, "worker stopping")
    assert state_of(r, agent_id) == "recovering" and indexes(r, agent_id) == {"active", "dispatch"}
    assert r.hget(K.stats, "recoveries") is None
    assert json.loads(r.hget(K.agent(agent_id), "recoveries") or "0") == 0
    assert admit(life, agent_id, "w2").outcome == "started"


def test_recovered_too_often_gives_up(life: Lifecycle, r: redis.Redis) -> None:
    agent_id, _, _ = life.create(record(), "t-1")
    r.hset(K.agent(agent_id), "recoveries", PARAMS.max_recoveries + 1)
    adm = admit(life, agent_id)
    assert adm.outcome == "give_up" and adm.fence


def test_resume_gets_a_fresh_window_and_makes_keys_permanent(life: Lifecycle, r: redis.Redis) -> None:
    clock = [1_800_000_000.0]
    timed = Lifecycle(r, K, PARAMS, clock=lambda: clock[0])
    agent_id, _, _ = timed.create(record(), "t-1")
    first = admit(timed, agent_id)
    assert first.window_start == clock[0]
    clock[0] += 700
    timed.finish(agent_id, "t-1", State.TIMED_OUT, {"result": {}}, fence=first.fence)
    resumed, previous, score = timed.resume(agent_id, "t-1", "op")
    assert resumed and previous == "timed_out" and r.zscore(K.dispatch, agent_id) == score
    assert r.ttl(K.agent(agent_id)) == -1 and r.ttl(K.task_index("t-1")) == -1 and r.ttl(K.fence(agent_id)) == -1
    second = admit(timed, agent_id)
    assert second.outcome == "started" and second.window_start == clock[0]  # not the first start
    assert r.zscore(K.deadlines, agent_id) == clock[0] + 600
    started_at = json.loads(r.hget(K.agent(agent_id), "started_at") or "null")
    assert started_at  # the result keeps its first start
    assert timed.resume(agent_id, "t-1", "op")[0] is False  # a running agent does not resume


def test_beat_retakes_a_lease_lost_to_an_outage_and_reports_stops(life: Lifecycle, r: redis.Redis) -> None:
    agent_id, _, _ = life.create(record(), "t-1")
    adm = admit(life, agent_id)
    r.delete(K.lease(agent_id))  # expired while Valkey was away; nobody fenced the run out
    reply = life.beat(agent_id, "w1", adm.fence, turns=3)
    assert reply.owned and r.exists(K.lease(agent_id)) and reply.killswitch_reason is None
    r.hset(K.killswitch, mapping={"engaged": "1", "reason": "spend"})
    r.set(K.stop_request(agent_id), "x")
    reply = life.beat(agent_id, "w1", adm.fence)
    assert reply.killswitch_reason == "spend" and reply.stop_request == "x"
    assert not life.beat(agent_id, "intruder", adm.fence).owned  # the lease belongs to its holder


def test_a_failover_that_loses_an_admission_never_gives_its_token_to_a_second_run(life: Lifecycle,
                                                                                     r: redis.Redis) -> None:
    agent_id, _, _ = life.create(record(), "t-1")
    before = {key: r.dump(key) for key in (K.agent(agent_id), K.fence(agent_id), K.lease(agent_id))}
    first = admit(life, agent_id, "host-a")
    # The primary dies before replicating the admission: the promoted replica still has the state from before.
    for key, value in before.items():
        r.delete(key)
        if value is not None:
            r.restore(key, 0, value)
    second = admit(life, agent_id, "host-b")
    assert second.outcome == "started" and second.fence != first.fence
    assert first.fence.split(":")[0] == second.fence.split(":")[0]  # the counter did go back...
    with pytest.raises(StaleFence):  # ... but the first run can no longer write
        life.save(agent_id, first.fence, {"by": "host-a"})
    assert life.finish(agent_id, "t-1", State.COMPLETED, {}, fence=second.fence) == 1


def test_dispatch_claims_are_exclusive(life: Lifecycle, r: redis.Redis) -> None:
    clock = [1_800_000_000.0]
    timed = Lifecycle(r, K, PARAMS, clock=lambda: clock[0])
    agent_id, _, _ = timed.create(record(), "t-1")
    assert timed.claim_dispatch() == []  # within its grace its sender is still expected to send it
    clock[0] += DISPATCH_GRACE_SECONDS + 1
    claimed = timed.claim_dispatch()
    assert [a for a, _ in claimed] == [agent_id]
    assert timed.claim_dispatch() == []  # a concurrent sweeper gets nothing until the retry time
    timed.dispatched(agent_id, claimed[0][1])
    assert r.zscore(K.dispatch, agent_id) is None


# -- property: no verb carrying a stale fence changes a newer run's state --------------------------------

VERBS = st.lists(st.tuples(st.sampled_from(["admit", "save", "beat", "hand_back", "finish", "recover", "resume",
                                             "lease_lapses"]),
                           st.integers(min_value=0, max_value=3)), min_size=1, max_size=25)


def snapshot(r: redis.Redis, agent_id: str) -> tuple[Any, ...]:
    rec = r.hgetall(K.agent(agent_id))
    rec.pop("heartbeat_at", None)
    return (rec, r.get(K.checkpoint(agent_id)), sorted(indexes(r, agent_id)), r.get(K.lease(agent_id)))


def check_indexes(r: redis.Redis, agent_id: str) -> None:
    state = State(state_of(r, agent_id))
    found = indexes(r, agent_id)
    if state.final:
        assert found == set(), (state, found)
    else:
        assert "active" in found, (state, found)
    assert ("heartbeats" in found) == ("deadlines" in found) == (state == State.RUNNING), (state, found)
    assert ("held" in found) == (state == State.HELD), (state, found)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=VERBS)
def test_stale_fences_never_change_a_newer_runs_state(valkey: Valkey, ops: list[tuple[str, int]]) -> None:
    with valkey.client(2) as r:
        r.flushdb()
        life = Lifecycle(r, K, PARAMS)
        agent_id, _, _ = life.create(record(), "t-1")
        runs: list[tuple[str, str]] = []  # (holder, fence) of every run ever admitted
        for verb, pick in ops:
            current = r.get(K.fence(agent_id)) or ""
            if verb == "admit":
                holder = f"w{len(runs)}"
                adm = admit(life, agent_id, holder)
                if adm.fence:
                    runs.append((holder, adm.fence))
            elif verb == "recover":
                r.zadd(K.heartbeats, {agent_id: 0}, xx=True)
                life.recover(agent_id, time.time() - 1, "dead")
            elif verb == "lease_lapses":
                r.delete(K.lease(agent_id))
            elif verb == "resume":
                life.resume(agent_id, "t-1", "op")
            elif runs:
                holder, fence = runs[pick % len(runs)]
                stale = fence != current
                before = snapshot(r, agent_id)
                try:
                    if verb == "save":
                        life.save(agent_id, fence, {"by": holder}, turns=fence)
                    elif verb == "beat":
                        life.beat(agent_id, holder, fence, turns=fence)
                    elif verb == "hand_back":
                        life.hand_back(agent_id, holder, fence, "bye")
                    elif verb == "finish":
                        life.finish(agent_id, "t-1", State.COMPLETED, {"by": holder}, fence=fence)
                except StaleFence:
                    assert stale
                if stale:
                    assert snapshot(r, agent_id) == before, (verb, holder, fence, current)
            check_indexes(r, agent_id)

"""The autoscaler on the real database and Redis: what it decides, what it launches or drains, and
the contract with the gateway (held requests, in-flight counts, triggers). No process is started:
launches stay pending (their task is sent on commit, which these tests do not reach)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apps.core import redis as redis_lib
from apps.fleet import demand, periodic, triggers
from apps.fleet.autoscale import autoscale_run
from apps.fleet.models import ModelScale, Node, NodeEvent, NodeStatus, ScaleDecision
from apps.fleet.reconcile import reconcile
from apps.fleet.services import node_create
from apps.fleet.transitions import node_transition

pytestmark = pytest.mark.django_db
S = NodeStatus


def _ready(model, *, running: int = 0, waiting: int = 0, use_spot: bool = False, launcher: str = "skypilot") -> Node:
    # Rows only: no process or cluster is started. The reconciler's tests use static rows (it looks
    # for the machines of the others); what gets launched stays pending here.
    endpoint = "http://127.0.0.1:9" if launcher == "static" else ""
    node = node_create(model=model, launcher=launcher, endpoint_url=endpoint, use_spot=use_spot, accelerator="L4:1")
    for status in (S.PROVISIONING, S.LOADING, S.READY):
        node_transition(node=node, to=status)
    Node.objects.filter(pk=node.pk).update(
        requests_running=running, requests_waiting=waiting, last_health_at=timezone.now()
    )
    return Node.objects.get(pk=node.pk)


def _policy(model, **fields) -> None:
    defaults = {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 10, "target_kv_cache_usage": None}
    for name, value in {**defaults, **fields}.items():
        setattr(model, name, value)
    model.save()


def _report_held(model_id: int, held: int, *, worker: str = "w1", at: float | None = None) -> None:
    async def report() -> None:
        client = redis_lib.async_client()
        assert client is not None
        try:
            await demand.report_held(client, model_id=model_id, worker_id=worker, held=held)
        finally:
            await client.aclose()

    asyncio.run(report())


def test_scale_up_under_load_launches_at_once_and_says_why(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=1, max_replicas=6)
    _ready(served_model, running=20, waiting=21)
    _ready(served_model, running=20, waiting=20)

    (decision,) = autoscale_run()

    assert decision.desired == 6 and decision.previous == 2  # ceil(81 / 10) = 9, capped at max 6
    assert len(decision.launched) == 4
    scale = ModelScale.objects.get(model=served_model)
    assert scale.desired == 6 and scale.ready == 2
    assert scale.reason.startswith("desired 6 (scale up") and "41 waiting, 40 running" in scale.reason
    assert "2 ready" in scale.reason and "cold start p50" in scale.reason
    (change,) = ScaleDecision.objects.filter(model=served_model)
    assert (change.previous, change.desired, change.inputs["waiting"]) == (2, 6, 41)
    new = Node.objects.filter(model=served_model, status=S.PENDING)
    assert new.count() == 4
    for node in new:
        assert NodeEvent.objects.filter(node=node, actor="autoscaler", message__contains="41 waiting").exists()


def test_scale_down_waits_for_the_window_then_drains_the_least_loaded(served_model, redis_db) -> None:
    # No warm pool: drained nodes are torn down, so the whole window (the warm hold: below).
    _policy(served_model, min_replicas=1, max_replicas=4, scale_down_window_s=300, warm_pool=False)
    busy = _ready(served_model, running=6)
    idle = _ready(served_model, running=0)
    light = _ready(served_model, running=2)
    ModelScale.objects.create(model=served_model, desired=3)

    (first,) = autoscale_run()
    assert first.desired == 3 and first.drained == [] and "down to 1 in 300 s" in first.reason

    ModelScale.objects.filter(model=served_model).update(below_since=timezone.now() - timedelta(seconds=301))
    (second,) = autoscale_run()

    assert second.desired == 1 and "scale down" in second.reason
    assert sorted(second.drained) == sorted([str(idle), str(light)])
    statuses = dict(Node.objects.values_list("pk", "status"))
    assert statuses == {busy.pk: S.READY, idle.pk: S.DRAINING, light.pk: S.DRAINING}
    assert Node.objects.get(pk=idle.pk).status_reason.startswith("scale down: desired 1")


def test_nodes_a_scale_down_stops_warm_wait_a_few_warm_starts_not_the_window(served_model, redis_db, settings) -> None:
    settings.FLEET_WARM_DOWN_HOLD_STARTS = 5
    settings.FLEET_DEFAULT_WARM_START_S = 10.0
    _policy(served_model, min_replicas=1, max_replicas=4, scale_down_window_s=300, warm_pool=True)
    busy = _ready(served_model, running=6, launcher="local")
    idle = _ready(served_model, running=0, launcher="local")
    ModelScale.objects.create(model=served_model, desired=2)
    (first,) = autoscale_run()
    # Nothing measured yet: FLEET_DEFAULT_WARM_START_S.
    assert first.desired == 2 and "down to 1 in 50 s (warm hold 5 × 10.0 s warm start)" in first.reason

    # A measured warm restart (restart → ready) replaces the default.
    now = timezone.now()
    Node.objects.filter(pk=busy.pk).update(restart_requested_at=now - timedelta(seconds=4), ready_at=now)
    ModelScale.objects.filter(model=served_model).update(below_since=now - timedelta(seconds=21))
    (second,) = autoscale_run()
    assert second.desired == 1 and "after warm hold 5 × 4.0 s warm start" in second.reason, second.reason
    assert second.drained == [str(idle)]


def test_spot_nodes_cannot_stop_warm_so_their_scale_down_waits_the_window(served_model, redis_db, settings) -> None:
    settings.FLEET_WARM_DOWN_HOLD_STARTS = 5
    _policy(served_model, min_replicas=1, max_replicas=4, scale_down_window_s=300, warm_pool=True)
    _ready(served_model, running=6, launcher="local")
    _ready(served_model, running=0, launcher="local", use_spot=True)
    ModelScale.objects.create(model=served_model, desired=2, below_since=timezone.now() - timedelta(seconds=60))
    (decision,) = autoscale_run()
    assert decision.desired == 2 and "down to 1 in 240 s;" in decision.reason, decision.reason


def test_never_below_min_replicas_even_when_idle(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=2, scale_down_window_s=0, idle_to_zero_s=0)
    for _ in range(3):
        _ready(served_model)
    ModelScale.objects.create(model=served_model, desired=3, last_busy_at=timezone.now() - timedelta(hours=1))

    (decision,) = autoscale_run()

    assert decision.desired == 2 and len(decision.drained) == 1
    assert Node.objects.filter(status=S.READY).count() == 2


def test_a_held_request_scales_a_model_from_zero_to_one(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=0)
    assert autoscale_run()[0].desired == 0  # nothing asked: nothing launched
    assert not Node.objects.exists()

    _report_held(served_model.pk, 1)
    (decision,) = autoscale_run(model_id=served_model.pk)

    assert decision.desired == 1 and "scale from zero" in decision.reason and "1 held" in decision.reason
    (node,) = Node.objects.filter(model=served_model)
    assert node.status == S.PENDING


def test_idle_past_idle_to_zero_drains_the_last_node(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=0, idle_to_zero_s=600)
    node = _ready(served_model)
    ModelScale.objects.create(model=served_model, desired=1, last_busy_at=timezone.now() - timedelta(seconds=300))
    assert autoscale_run()[0].desired == 1  # idle 300 s of 600

    ModelScale.objects.filter(model=served_model).update(last_busy_at=timezone.now() - timedelta(seconds=601))
    (decision,) = autoscale_run()

    assert decision.desired == 0 and "scale to zero" in decision.reason
    assert Node.objects.get(pk=node.pk).status == S.DRAINING


def test_held_reports_are_summed_per_model_and_old_ones_ignored_then_removed(redis_db) -> None:
    client = redis_lib.client()
    _report_held(7, 3, worker="w1")
    _report_held(7, 2, worker="w2")
    _report_held(8, 0, worker="w1")  # a worker that holds nothing any more reports 0
    client.hset(demand.held_key(), mapping={"7:w-dead": f"9:{time.time() - 60:.3f}", "garbage": "x"})

    assert demand.held_by_model(client) == {7: 5}
    assert set(client.hkeys(demand.held_key())) == {b"7:w1", b"7:w2", b"8:w1"}
    assert demand.held_by_model(None) == {}
    with pytest.raises(ValueError):
        _report_held(7, -1)


def test_the_held_key_names_its_redis_database(settings) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:6379/3"
    assert demand.held_key() == "crosslogic:3:held"
    settings.REDIS_URL = "redis://127.0.0.1:6379/11"
    assert demand.held_key() == "crosslogic:11:held" and demand.trigger_key(5) == "crosslogic:11:autoscale-trigger:5"


def test_the_gateways_in_flight_counts_are_read_from_its_load_board(served_model, redis_db) -> None:
    from apps.gateway.routing import LoadBoard

    node = _ready(served_model)

    async def publish() -> None:
        client = redis_lib.async_client()
        assert client is not None
        try:
            for count in (3, 2):  # two gateway workers
                board = LoadBoard()
                for _ in range(count):
                    board.acquire(node.pk)
                await board.sync(client)
        finally:
            await client.aclose()

    asyncio.run(publish())
    assert demand.inflight_by_node(redis_lib.client()) == {node.pk: 5}

    (decision,) = autoscale_run()
    assert "5 in flight at the gateway" in decision.reason


def test_enqueue_autoscale_sends_one_task_per_model_per_two_seconds(
    redis_db, monkeypatch, django_capture_on_commit_callbacks
) -> None:
    sent: list[int | None] = []
    monkeypatch.setattr(periodic.fleet_autoscale, "delay", lambda model_id=None: sent.append(model_id))

    with django_capture_on_commit_callbacks(execute=True):
        assert triggers.enqueue_autoscale(model_id=5) is True
        assert triggers.enqueue_autoscale(model_id=5) is False  # a burst of held requests: one run
        assert triggers.enqueue_autoscale(model_id=6) is True
    assert sent == [5, 6]
    assert 0 < redis_lib.client().ttl(demand.trigger_key(5)) <= demand.TRIGGER_TTL_S


def test_the_reconciler_keeps_the_autoscalers_count_and_never_scales_down(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=1, max_replicas=5)
    _ready(served_model, launcher="static")
    ModelScale.objects.create(model=served_model, desired=3)

    report = reconcile()

    assert len(report.launched) == 2
    assert Node.objects.filter(model=served_model, status=S.PENDING).count() == 2
    ModelScale.objects.filter(model=served_model).update(desired=1)
    reconcile()
    assert not Node.objects.filter(status=S.DRAINING).exists()  # scaling down is the autoscaler's call


# --- spot with on-demand fallback ------------------------------------------------------------


def _preempted_spot(model, *, ago_s: float = 60) -> Node:
    node = _ready(model, use_spot=True, launcher="local")
    node_transition(node=node, to=S.TERMINATING, reason="preempted: the machine vanished")
    node_transition(node=node, to=S.TERMINATED, reason="preempted")
    Node.objects.filter(pk=node.pk).update(status_changed_at=timezone.now() - timedelta(seconds=ago_s))
    return node


def test_preempted_spot_nodes_are_replaced_on_demand_then_spot_again_after_the_window(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=1, spot_fallback=True, spot_fallback_preemptions=2, spot_fallback_window_s=600)
    _preempted_spot(served_model)
    _preempted_spot(served_model)

    reconcile()

    (replacement,) = Node.objects.filter(status=S.PENDING)
    assert replacement.use_spot is False
    assert NodeEvent.objects.filter(
        node=replacement, actor="reconciler", message__contains="on-demand: 2 spot preemption(s) in the last 10 min"
    ).exists()

    # Past the window (the cool-off), the next scale-up tries spot first again.
    Node.objects.filter(status=S.TERMINATED).update(status_changed_at=timezone.now() - timedelta(seconds=601))
    Node.objects.filter(pk=replacement.pk).update(status=S.TERMINATED)
    reconcile()
    (again,) = Node.objects.filter(status=S.PENDING)
    assert again.use_spot is True


def test_one_preemption_below_the_threshold_stays_on_spot(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=1, spot_fallback=True, spot_fallback_preemptions=2)
    _preempted_spot(served_model)
    reconcile()
    assert Node.objects.get(status=S.PENDING).use_spot is True


def test_a_spot_launch_without_capacity_falls_back_to_on_demand_at_once(served_model, redis_db, settings) -> None:
    settings.FLEET_RELAUNCH_BACKOFF_S = 3600  # the brake would hold a relaunch into the same error
    _policy(served_model, min_replicas=1, spot_fallback=True)
    failed = node_create(model=served_model, launcher="local", use_spot=True)
    node_transition(node=failed, to=S.PROVISIONING)
    node_transition(node=failed, to=S.FAILED, reason="no capacity: tried 3 placement(s)")

    report = reconcile()

    (fallback,) = Node.objects.filter(status=S.PENDING)
    assert fallback.use_spot is False and report.launched == [str(fallback)]
    assert NodeEvent.objects.filter(node=fallback, actor="reconciler", message__contains="failed for capacity").exists()


def test_without_spot_fallback_the_last_nodes_choice_is_kept(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=1, spot_fallback=False)
    _preempted_spot(served_model)
    _preempted_spot(served_model)
    reconcile()
    assert Node.objects.get(status=S.PENDING).use_spot is True


# --- single flight ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_autoscaler_runs_at_once_decide_once(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=0, max_replicas=8)
    _report_held(served_model.pk, 35)  # a backlog the first node drains → 1 node
    barrier = threading.Barrier(2)
    results: list[list] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(5)
            results.append(autoscale_run())
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert errors == []
    assert Node.objects.filter(model=served_model).count() == 1  # not 2
    assert ScaleDecision.objects.filter(model=served_model).count() == 1
    decided = [d for r in results for d in r if d.launched]
    assert len(decided) == 1 and len(decided[0].launched) == 1


def test_a_run_while_another_holds_the_lock_does_nothing(served_model, redis_db) -> None:
    from apps.fleet import autoscale

    _report_held(served_model.pk, 5)
    redis_lib.client().set(autoscale._lock_key(), "someone-else", ex=30)
    assert autoscale_run() == []
    assert not Node.objects.exists()


def test_a_static_node_counts_but_is_never_scaled_away(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=0, scale_down_window_s=0, idle_to_zero_s=0)
    static = _ready(served_model, launcher="static")
    launched = _ready(served_model)
    ModelScale.objects.create(model=served_model, desired=2, last_busy_at=timezone.now() - timedelta(hours=1))

    (decision,) = autoscale_run()

    assert decision.desired == 0 and decision.drained == [str(launched)]
    assert Node.objects.get(pk=static.pk).status == S.READY


# --- admin and management API ----------------------------------------------------------------


def test_the_admin_shows_desired_vs_actual_replicas_with_the_reason(admin_client, served_model, redis_db) -> None:
    from django.urls import reverse

    _policy(served_model, min_replicas=1, max_replicas=6)
    _ready(served_model, running=20, waiting=21)
    autoscale_run()

    listing = admin_client.get(reverse("admin:catalog_servedmodel_changelist")).content.decode()
    assert "Replicas: desired / ready (min–max)" in listing
    assert "5 / 1 (1–6)" in listing and "41 running, 21 waiting" not in listing  # the reason is the tooltip
    assert 'title="desired 5 (scale up' in listing
    page = admin_client.get(reverse("admin:catalog_servedmodel_change", args=[served_model.pk])).content.decode()
    assert "<b>desired 5</b> · ready 1 · starting 0" in page and "21 waiting, 20 running" in page
    assert "1 → 5" in page  # the history of changes
    for field in ("target_ongoing_requests", "scale_down_window_s", "idle_to_zero_s", "spot_fallback", "warm_pool"):
        assert f'name="{field}"' in page


def test_the_api_exposes_the_policy_and_the_decision_and_refuses_bad_values(staff_client, served_model, redis_db):
    url = f"/api/v1/models/{served_model.pk}/"
    for bad, field in [
        ({"target_kv_cache_usage": 1.5}, "target_kv_cache_usage"),
        ({"target_ongoing_requests": 0}, "target_ongoing_requests"),
        ({"spot_fallback_preemptions": 0}, "spot_fallback_preemptions"),
        ({"spot_fallback_window_s": 10}, "spot_fallback_window_s"),
        ({"scale_down_window_s": -1}, "scale_down_window_s"),
        ({"target_queue_wait_s": "soon"}, "target_queue_wait_s"),
        ({"min_replicas": 0, "max_replicas": 0}, "max_replicas"),
    ]:
        response = staff_client.patch(url, bad, format="json")
        assert response.status_code == 400 and field in response.json()["error"]["fields"], (bad, response.content)

    ok = staff_client.patch(
        url,
        {"min_replicas": 0, "target_ongoing_requests": 8, "target_queue_wait_s": 1.5, "warm_pool": False},
        format="json",
    )
    assert ok.status_code == 200, ok.content
    body = ok.json()
    assert (body["target_ongoing_requests"], body["target_queue_wait_s"], body["warm_pool"]) == (8, 1.5, False)
    assert body["autoscale"] is None  # no decision yet
    autoscale_run()
    decided = staff_client.get(url).json()["autoscale"]
    assert decided["desired"] == 0 and decided["reason"].startswith("desired 0")


def test_a_triggered_pass_that_meets_a_running_one_tries_again_a_second_later(redis_db, monkeypatch) -> None:
    from apps.fleet import autoscale

    later: list[tuple[list, int]] = []
    monkeypatch.setattr(
        periodic.fleet_autoscale, "apply_async", lambda args, countdown: later.append((args, countdown))
    )
    redis_lib.client().set(autoscale._lock_key(), "a beat pass", ex=30)

    periodic.fleet_autoscale(5)
    periodic.fleet_autoscale(5, 3)  # the last attempt gives up: the beat tick follows anyway

    assert later == [([5, 1], 1)]


def test_a_paused_local_node_that_died_is_failed_and_replaced_in_the_same_pass(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=0, max_replicas=2, spot_fallback=False)
    node = _ready(served_model, launcher="local")
    Node.objects.filter(pk=node.pk).update(launcher_state={"pid": 2**22 + 7})  # no such process
    node = Node.objects.get(pk=node.pk)
    node_transition(node=node, to=S.DRAINING)
    node_transition(node=node, to=S.STOPPING)
    node_transition(node=node, to=S.STOPPED, stopped_at=timezone.now())
    ModelScale.objects.create(model=served_model, desired=0)
    _report_held(served_model.pk, 1)

    (decision,) = autoscale_run()

    assert decision.restarted == [] and len(decision.launched) == 1
    assert "warm restart failed: the paused local node process is gone" in decision.error
    assert Node.objects.get(pk=node.pk).status == S.FAILED


def test_a_node_launched_by_hand_is_adopted_not_drained_at_once(served_model, redis_db) -> None:
    from apps.fleet.placement import Placement
    from apps.fleet.services import node_request_launch

    _policy(served_model, min_replicas=1, max_replicas=3, scale_down_window_s=300)
    _ready(served_model)
    assert autoscale_run()[0].desired == 1
    (extra,) = node_request_launch(model=served_model, placement=Placement(launcher="local"), actor="ops")

    (decision,) = autoscale_run()

    assert decision.desired == 2 and decision.drained == [] and "down to 1 in " in decision.reason
    assert Node.objects.get(pk=extra.pk).status == S.PENDING


def test_a_model_seen_for_the_first_time_is_not_idle_for_ever(served_model, redis_db) -> None:
    _policy(served_model, min_replicas=0, idle_to_zero_s=600)
    node = _ready(served_model)  # launched by hand before the autoscaler ever looked

    (decision,) = autoscale_run()

    assert decision.desired == 1 and "until idle 600 s" in decision.reason
    assert Node.objects.get(pk=node.pk).status == S.READY


def test_the_cold_start_is_the_median_of_the_models_own_launches_on_the_accelerator(served_model, settings) -> None:
    from apps.catalog.services import model_create
    from apps.fleet.autoscale import cold_start_p50

    settings.FLEET_DEFAULT_COLD_START_S = 60.0
    assert cold_start_p50("L4:1", model_id=served_model.pk) == 60.0  # nothing measured yet
    other = model_create(name="other-model")
    now = timezone.now()
    for model, seconds in [(other, 20), (served_model, 40), (served_model, 50), (served_model, 90)]:
        node = node_create(model=model, launcher="local", accelerator="L4:1")
        Node.objects.filter(pk=node.pk).update(requested_at=now - timedelta(seconds=seconds), ready_at=now)
    warm = node_create(model=served_model, launcher="local", accelerator="L4:1")
    Node.objects.filter(pk=warm.pk).update(
        requested_at=now - timedelta(hours=2), ready_at=now, restart_requested_at=now
    )

    assert cold_start_p50("L4:1", model_id=served_model.pk) == pytest.approx(50, abs=0.5)  # warm restart left out
    assert cold_start_p50("L4:1", model_id=other.pk) == pytest.approx(20, abs=0.5)
    assert cold_start_p50("L4:1", model_id=12345) == pytest.approx(45, abs=0.5)  # any model's: 20 40 50 90


def test_the_service_time_is_the_mean_decode_of_the_models_last_minute(served_model, redis_db, tenant) -> None:
    from apps.metering.tests.factories import make_usage

    _policy(served_model, min_replicas=1)
    _ready(served_model, running=2)
    make_usage(tenant=tenant, model=served_model, ttft_ms=2040.0, latency_ms=2800.0)  # 2 s queued, 0.76 s decode
    make_usage(tenant=tenant, model=served_model, ttft_ms=50.0, latency_ms=790.0)
    make_usage(
        tenant=tenant,
        model=served_model,
        ttft_ms=50.0,
        latency_ms=9050.0,
        created_at=timezone.now() - timedelta(minutes=5),
    )
    (decision,) = autoscale_run()
    scale = ModelScale.objects.get(model=served_model)
    assert scale.inputs["service_s"] == pytest.approx(0.75)  # the queue wait and the old record left out
    assert "service ~0.75 s" in decision.reason

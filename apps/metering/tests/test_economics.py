"""GPU-cost economics against hand-computed numbers (docs/economics.md shows the same arithmetic).

The fixture, all times UTC, window 2026-11-01 00:00 → 2026-11-03 00:00, "now" 2026-11-02 12:00:

- node 1, model A, L4:1 at $0.80/h: requested 11-01 22:00, terminated 11-02 02:30 (spans midnight)
  → 11-01: 2 h = $1.60; 11-02: 2.5 h = $2.00.
- node 2, model A, A100:2 at $2.50/h: requested 11-02 09:20, still running at 12:00
  → 2 h 40 min = 9,600 s: floor(2,500,000 x 9,600 / 3,600) = 6,666,666 µ$; 5.333… GPU-hours.
- node 3, model B, H100:8 at $10/h: 10-30 → 10-31, outside the window: nothing.
- node 4, model B, L4 at $1/h: requested 11-01 10:00, failed 10:30, machine torn down 10:45
  → 45 min = $0.75.
- model A stores 16 GB: 16 x $0.015 = $0.24 a month = 8,000 µ$ a day (30-day month).
- model A's usage on 11-02: 1,000,000 + 500,000 and 200,000 + 300,000 tokens, $3.00 + $1.20.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from apps.catalog.models import ServedModel
from apps.fleet.health import Result, Summary, apply_results
from apps.fleet.load_history import LoadSample, node_load_record
from apps.fleet.metrics import NodeLoad
from apps.fleet.models import Node, NodeEvent, NodeLoadHour, NodeStatus
from apps.metering import economics
from apps.metering.tests.factories import make_usage
from apps.tenancy.models import Tenant

pytestmark = pytest.mark.django_db

SINCE = datetime(2026, 11, 1, tzinfo=UTC)
UNTIL = datetime(2026, 11, 3, tzinfo=UTC)
NOW = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
D1, D2 = date(2026, 11, 1), date(2026, 11, 2)


def _node(model, *, accel, hourly, status, requested, events, terminated_at=None, state=None) -> Node:
    node = Node.objects.create(
        model=model,
        accelerator=accel,
        hourly_cost=Decimal(hourly),
        status=status,
        requested_at=requested,
        terminated_at=terminated_at,
        launcher_state=state or {},
    )
    for when, kind, to, message in events:
        NodeEvent.objects.create(node=node, created_at=when, kind=kind, to_status=to, message=message)
    return node


@pytest.fixture
def fleet():
    model_a = ServedModel.objects.create(name="model-a", hf_repo="org/a", total_bytes=16_000_000_000)
    model_b = ServedModel.objects.create(name="model-b", hf_repo="org/b")
    req, tr = NodeEvent.Kind.ACTION, NodeEvent.Kind.TRANSITION
    node1 = _node(
        model_a,
        accel="L4:1",
        hourly="0.8000",
        status=NodeStatus.TERMINATED,
        # The row's own timestamps are a minute off: the event log is what bills.
        requested=datetime(2026, 11, 1, 21, 59, tzinfo=UTC),
        terminated_at=datetime(2026, 11, 2, 2, 31, tzinfo=UTC),
        events=[
            (datetime(2026, 11, 1, 22, 0, tzinfo=UTC), req, NodeStatus.PENDING, "requested (skypilot)"),
            (datetime(2026, 11, 1, 22, 10, tzinfo=UTC), tr, NodeStatus.READY, ""),
            (datetime(2026, 11, 2, 2, 30, tzinfo=UTC), tr, NodeStatus.TERMINATED, "torn down"),
        ],
    )
    node2 = _node(
        model_a,
        accel="A100:2",
        hourly="2.5000",
        status=NodeStatus.READY,
        requested=datetime(2026, 11, 2, 9, 20, tzinfo=UTC),
        events=[(datetime(2026, 11, 2, 9, 20, tzinfo=UTC), req, NodeStatus.PENDING, "requested (skypilot)")],
    )
    _node(
        model_b,
        accel="H100:8",
        hourly="10.0000",
        status=NodeStatus.TERMINATED,
        requested=datetime(2026, 10, 30, 10, tzinfo=UTC),
        terminated_at=datetime(2026, 10, 31, 10, tzinfo=UTC),
        events=[
            (datetime(2026, 10, 30, 10, tzinfo=UTC), req, NodeStatus.PENDING, "requested (skypilot)"),
            (datetime(2026, 10, 31, 10, tzinfo=UTC), tr, NodeStatus.TERMINATED, ""),
        ],
    )
    _node(
        model_b,
        accel="L4",
        hourly="1.0000",
        status=NodeStatus.FAILED,
        requested=datetime(2026, 11, 1, 10, tzinfo=UTC),
        state={"torn_down": True},
        events=[
            (datetime(2026, 11, 1, 10, tzinfo=UTC), req, NodeStatus.PENDING, "requested (skypilot)"),
            (datetime(2026, 11, 1, 10, 30, tzinfo=UTC), tr, NodeStatus.FAILED, "launch failed"),
            (datetime(2026, 11, 1, 10, 45, tzinfo=UTC), NodeEvent.Kind.INFO, "", "machine torn down after failure"),
        ],
    )
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    make_usage(
        tenant=tenant,
        model=model_a,
        prompt_tokens=1_000_000,
        completion_tokens=500_000,
        cost_micros=3_000_000,
        created_at=datetime(2026, 11, 2, 10, tzinfo=UTC),
    )
    make_usage(
        tenant=tenant,
        model=model_a,
        prompt_tokens=200_000,
        completion_tokens=300_000,
        cost_micros=1_200_000,
        created_at=datetime(2026, 11, 2, 11, 59, tzinfo=UTC),
    )
    # Load history: (node, hour, samples, busy)
    for node, hour, samples, busy in [
        (node1, datetime(2026, 11, 1, 23, tzinfo=UTC), 4, 4),
        (node1, datetime(2026, 11, 2, 0, tzinfo=UTC), 4, 2),
        (node2, datetime(2026, 11, 2, 10, tzinfo=UTC), 240, 180),
        (node2, datetime(2026, 11, 2, 11, tzinfo=UTC), 240, 240),
    ]:
        NodeLoadHour.objects.create(node=node, hour=hour, samples=samples, busy_samples=busy)
    return model_a, model_b, node1, node2


def _rows(model_a, model_b):
    return economics.model_days(
        since=SINCE,
        until=UNTIL,
        now=NOW,
        usage=economics.usage_days_from_records(since=SINCE, until=UNTIL),
        storage={model_a.pk: (model_a.total_bytes, date(2026, 10, 1)), model_b.pk: (0, date(2026, 10, 1))},
    )


def test_node_spans_bill_from_requested_to_terminated_events(fleet):
    _, model_b, node1, node2 = fleet
    spans = {s.node_id: s for s in economics.node_spans(since=SINCE, until=UNTIL, now=NOW)}
    assert len(spans) == 3  # node 3 ended before the window
    assert (spans[node1.pk].start, spans[node1.pk].end) == (
        datetime(2026, 11, 1, 22, tzinfo=UTC),
        datetime(2026, 11, 2, 2, 30, tzinfo=UTC),
    )
    assert spans[node1.pk].total_cost == 3_600_000
    assert spans[node2.pk].running and spans[node2.pk].end == NOW
    assert spans[node2.pk].total_cost == 6_666_666
    failed = next(s for s in spans.values() if s.model_id == model_b.pk)
    assert failed.total_cost == 750_000 and not failed.running


def test_economics_per_model_per_day_match_the_hand_computed_numbers(fleet):
    model_a, model_b, _, _ = fleet
    rows = {(r.model_id, r.day): r for r in _rows(model_a, model_b)}
    assert set(rows) == {(model_a.pk, D1), (model_a.pk, D2), (model_b.pk, D1)}

    a1 = rows[(model_a.pk, D1)]
    assert (a1.gpu_cost_micros, a1.storage_cost_micros, a1.revenue_micros) == (1_600_000, 8_000, 0)
    assert a1.margin_micros == -1_608_000
    assert a1.gpu_hours == pytest.approx(2.0)
    assert a1.utilisation == pytest.approx(0.5)  # 1 busy hour (4/4 checks) of 2
    assert a1.idle_gpu_hours == pytest.approx(1.0)
    assert a1.gpu_cost_per_mtok_micros is None

    a2 = rows[(model_a.pk, D2)]
    assert a2.gpu_cost_micros == 2_000_000 + 6_666_666
    assert (a2.revenue_micros, a2.tokens, a2.requests) == (4_200_000, 2_000_000, 2)
    assert a2.storage_cost_micros == 8_000
    assert a2.margin_micros == 4_200_000 - 8_666_666 - 8_000
    assert a2.gpu_cost_per_mtok_micros == 4_333_333  # 8,666,666 µ$ / 2M tokens
    # GPU-hours: node 1 2.5 h x 1 + node 2 (9,600 s) x 2 GPUs; busy: 0.5 + 0.75 x 2 + 1 x 2.
    assert a2.gpu_hours == pytest.approx(2.5 + 9600 * 2 / 3600)
    assert a2.utilisation == pytest.approx(4.0 / (2.5 + 9600 * 2 / 3600))
    assert a2.idle_gpu_hours == pytest.approx(2.5 + 9600 * 2 / 3600 - 4.0)

    b1 = rows[(model_b.pk, D1)]
    assert (b1.gpu_cost_micros, b1.storage_cost_micros, b1.margin_micros) == (750_000, 0, -750_000)
    assert b1.utilisation == 0.0 and b1.idle_gpu_hours == pytest.approx(0.75)


def test_days_of_a_node_add_up_to_its_total_to_the_micro_dollar():
    start = datetime(2026, 11, 1, 23, 59, 59, 999_999, tzinfo=UTC)
    span = economics.NodeSpan(1, 1, "L4", economics.usd_to_micros("0.7777"), start, start + timedelta(days=3), False)
    pieces = economics.gpu_by_model_day([span], start - timedelta(days=1), start + timedelta(days=5))
    assert len(pieces) == 4
    assert sum(p.gpu_cost_micros for p in pieces.values()) == span.total_cost == 777_700 * 72


def test_storage_accrues_per_day_without_losing_a_micro_dollar(settings):
    settings.R2_STORAGE_PRICE_PER_GB_MONTH = Decimal("0.01")
    # 1 GB at $0.01 a month = 10,000 µ$ over 30 days: 333.33… a day.
    days = [economics.storage_cost_between(10**9, date(2026, 1, d), date(2026, 1, d + 1)) for d in range(1, 31)]
    assert set(days) == {333, 334}
    assert sum(days) == economics.storage_cost_between(10**9, date(2026, 1, 1), date(2026, 1, 31)) == 10_000
    assert economics.storage_cost_per_month(10**9) == 10_000
    settings.R2_STORAGE_PRICE_PER_GB_MONTH = Decimal("0.015")
    assert economics.storage_cost_per_month(16_000_000_000) == 240_000


def test_gpu_count_reads_skypilot_accelerator_strings():
    assert [economics.gpu_count(a) for a in ("A100:8", "L4", "", "H100-80GB:4", "x:0")] == [8, 1, 1, 4, 1]


def test_health_checks_record_one_sample_per_node_per_hour(fleet):
    _, _, node1, node2 = fleet
    node1.status, node1.endpoint_url = NodeStatus.READY, "http://127.0.0.1:9"
    node1.save()
    for running in (3, 0):
        apply_results(
            [node1, node2],
            [
                Result(node1.pk, True, 5.0, NodeLoad(running=running, waiting=0, kv_cache_usage=0.5)),
                Result(node2.pk, False, error="refused"),
            ],
            Summary(),
        )
    now_hour = NodeLoadHour.objects.latest("hour").hour  # the hour the two passes ran in
    current = {r.node_id: r for r in NodeLoadHour.objects.filter(hour=now_hour)}
    assert (current[node1.pk].samples, current[node1.pk].busy_samples, current[node1.pk].running_sum) == (2, 1, 3)
    assert (current[node2.pk].samples, current[node2.pk].busy_samples) == (2, 0)


def test_load_samples_add_up_under_repeated_upserts(fleet):
    _, _, node1, node2 = fleet
    when = datetime(2026, 11, 5, 7, 42, tzinfo=UTC)
    for _ in range(3):
        node_load_record(samples=[LoadSample(node1.pk, True, 2, 1), LoadSample(node2.pk, True, 0, 0)], at=when)
    node_load_record(samples=[LoadSample(node1.pk, False, 5, 5)], at=when)  # a failed check: not busy
    row = NodeLoadHour.objects.get(node=node1, hour=datetime(2026, 11, 5, 7, tzinfo=UTC))
    assert (row.samples, row.busy_samples, row.running_sum, row.waiting_sum) == (4, 3, 6, 3)
    idle = NodeLoadHour.objects.get(node=node2, hour=datetime(2026, 11, 5, 7, tzinfo=UTC))
    assert (idle.samples, idle.busy_samples) == (3, 0)


def test_usd_shows_micro_dollars_rounded_half_up_without_floats():
    from apps.metering.admin_panels import usd

    assert [usd(8_666_666), usd(-1_608_000), usd(4_999_950), usd(1_234_567_891, 2), usd(None)] == [
        "$8.6667",
        "-$1.6080",
        "$5.0000",
        "$1,234.57",
        "–",
    ]


def test_the_model_page_shows_its_economics(fleet, admin_client):
    from apps.metering.admin_panels import model_economics_panel

    model_a, _, _, _ = fleet
    ServedModel.objects.filter(pk=model_a.pk).update(created_at=datetime(2026, 10, 1, tzinfo=UTC))
    model_a.refresh_from_db()
    html = model_economics_panel(model_a, now=NOW)
    # 11-02: revenue $4.20, GPU $8.666666, storage $0.008, margin -$4.474666; 11-01: -$1.608.
    for text in ("$4.2000", "$8.6667", "$0.0080", "-$4.4747", "-$1.6080", "2,000,000", "$4.3333", "51.1 %"):
        assert text in html, text
    assert "$0.2400</b> a month" in html  # 16 GB at $0.015
    assert "→ now" in html  # node 2 is still running
    page = admin_client.get(f"/admin/catalog/servedmodel/{model_a.pk}/change/")
    assert page.status_code == 200 and 'id="model-economics"' in page.content.decode()

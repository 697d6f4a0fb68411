"""Economics on the model's admin page (apps.catalog.admin shows it as a read-only field).

Rendered here, next to the numbers, so the catalog admin only asks for the panel: the same
selectors as the dashboard, for one model, over ECONOMICS_PANEL_DAYS UTC days.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from apps.catalog.display import human_bytes
from apps.catalog.models import ServedModel
from apps.metering import economics
from apps.metering.dashboard import usage_days

ECONOMICS_PANEL_DAYS = 14
NODE_ROWS = 20


def usd(micros: int | None, places: int = 4) -> str:
    """Micro-dollars as dollars, exactly (integer arithmetic: no float ever touches money)."""
    if micros is None:
        return "–"
    sign = "-" if micros < 0 else ""
    step = 10 ** (6 - places)  # places <= 6; rounded half-up at the last place shown
    whole, frac = divmod((abs(micros) + step // 2) // step, 10**places)
    return f"{sign}${whole:,}" + (f".{frac:0{places}d}" if places else "")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def model_economics_panel(model: ServedModel, *, now: datetime | None = None) -> SafeString:
    now = now or timezone.now()
    today = now.astimezone(UTC).date()
    since = datetime.combine(today - timedelta(days=ECONOMICS_PANEL_DAYS - 1), datetime.min.time(), tzinfo=UTC)
    until = datetime.combine(today + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    spans = economics.node_spans(since=since, until=until, now=now, model_id=model.pk)
    rows = economics.model_days(
        since=since,
        until=until,
        now=now,
        usage=[u for u in usage_days(since=since, until=until, now=now) if u.model_id == model.pk],
        storage={model.pk: (model.total_bytes, model.created_at.date())},
        spans=spans,
        model_id=model.pk,
    )
    total = economics.totals_by_model(rows).get(model.pk) or economics.ModelDay(model.pk, today)
    storage = format_html(
        "<p>Weights in R2: {} → <b>{}</b> a month at ${} per GB-month (R2_STORAGE_PRICE_PER_GB_MONTH).</p>",
        human_bytes(model.total_bytes),
        usd(economics.storage_cost_per_month(model.total_bytes)),
        settings.R2_STORAGE_PRICE_PER_GB_MONTH,
    )
    head = format_html_join(
        "",
        "<th>{}</th>",
        (
            (h,)
            for h in (
                "day (UTC)",
                "revenue",
                "GPU cost",
                "storage",
                "margin",
                "tokens",
                "GPU $ / 1M tokens",
                "utilisation",
                "GPU-hours",
                "idle GPU-hours",
                "nodes",
            )
        ),
    )

    def cells(label: str, r: economics.ModelDay) -> tuple[object, ...]:
        return (
            label,
            usd(r.revenue_micros),
            usd(r.gpu_cost_micros),
            usd(r.storage_cost_micros),
            usd(r.margin_micros),
            f"{r.tokens:,}",
            usd(r.gpu_cost_per_mtok_micros),
            _pct(r.utilisation),
            f"{r.gpu_hours:.2f}",
            f"{r.idle_gpu_hours:.2f}",
            len(r.nodes),
        )

    template = "<tr>" + "<td>{}</td>" * 11 + "</tr>"
    body = format_html_join("", template, (cells(r.day.isoformat(), r) for r in reversed(rows)))
    foot = format_html_join("", template.replace("td>", "th>"), [cells(f"{ECONOMICS_PANEL_DAYS} days", total)])
    node_rows = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        (
            (
                f"node-{s.node_id}",
                s.accelerator or "–",
                usd(s.hourly_micros, 2) + "/h",
                f"{s.start:%Y-%m-%d %H:%M} → " + ("now" if s.running else f"{s.end:%Y-%m-%d %H:%M}"),
                f"{(s.end - s.start).total_seconds() / 3600:.2f}",
                usd(s.total_cost),
            )
            for s in sorted(spans, key=lambda s: -s.total_cost)[:NODE_ROWS]
        ),
    )
    nodes = (
        format_html(
            '<table id="model-economics-nodes"><thead><tr><th>node</th><th>accelerator</th><th>price</th>'
            "<th>billed (requested → terminated)</th><th>hours</th><th>GPU cost</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            node_rows,
        )
        if spans
        else mark_safe("<p>No node was billed in these days.</p>")
    )
    return format_html(
        '<div id="model-economics">{}<table id="model-economics-days"><thead><tr>{}</tr></thead>'
        "<tbody>{}</tbody><tfoot>{}</tfoot></table><p>GPU cost per node (whole billed span):</p>{}"
        "<p>Definitions: docs/economics.md.</p></div>",
        storage,
        head,
        body,
        foot,
        nodes,
    )

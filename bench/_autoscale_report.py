"""The table, the targets, the chart and the docs section of bench/autoscale_bench.py. Not a test."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path
from typing import Any

START = "<!-- autoscale-bench:start -->"
END = "<!-- autoscale-bench:end -->"
LABELS = {
    "static": "(a) static at peak",
    "qps": "(b) SkyServe-style QPS",
    "qps-day": "(b') QPS, delays scaled like the day",
    "ours": "(c) ours",
    "ours-rerun": "(c) ours, rerun",
    "ours-before": "(c0) ours before the #13 tuning",
    "ours-step": "(c1) tuning step: one node down per window",
}
# Rows shown for comparison only (earlier versions of the autoscaler): not judged against the targets.
NOT_JUDGED = ("ours-before", "ours-step")


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


def _s(values: list[float]) -> str:
    if not values:
        return "–"
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 2]:.1f} s (n={len(values)})"


def targets(out: dict[str, Any]) -> list[str]:
    res = {name: r["summary"] for name, r in out["results"].items()}
    lines: list[str] = []
    for name in [n for n in res if n.startswith("ours") and n not in NOT_JUDGED]:
        if len(lines):
            lines.append("")
        lines.append(f"{LABELS.get(name, name)}:")
        lines += _targets(res, res[name])
    return lines or ["Targets: not judged (policy (c) was not run)."]


def _targets(res: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    lines = []
    lines.append(f"- zero failed requests: {ours['failed']} failed → {'met' if ours['failed'] == 0 else 'NOT met'}")
    static = res.get("static")
    if static is not None:
        a, b = ours["ttft_p95_outside_first_burst_ms"], static["ttft_p95_outside_first_burst_ms"]
        if a is not None and b:
            ok = a <= 2 * b
            lines.append(
                f"- p95 TTFT outside the first burst within 2× static: {a:,.0f} ms vs {b:,.0f} ms "
                f"({a / b:.2f}×) → {'met' if ok else 'NOT met'}"
            )
        share = ours["node_seconds"] / static["node_seconds"] if static["node_seconds"] else float("nan")
        lines.append(
            f"- node-seconds ≤ 40% of static: {ours['node_seconds']:,.0f} vs {static['node_seconds']:,.0f} "
            f"({share:.0%}) → {'met' if share <= 0.40 else 'NOT met'}"
        )
    qps = res.get("qps")
    if qps is not None:
        ok = ours["node_seconds"] < qps["node_seconds"]
        lines.append(
            f"- node-seconds below the QPS policy's: {ours['node_seconds']:,.0f} vs {qps['node_seconds']:,.0f} "
            f"→ {'met' if ok else 'NOT met'}"
        )
    return lines


def render(out: dict[str, Any], argv: list[str]) -> str:
    scale = out["scale"]
    args = out["args"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(out["started"]))
    head = (
        f"Measured {when} on {platform.machine()}, Python {platform.python_version()}; command "
        f"`.venv/bin/python bench/autoscale_bench.py {' '.join(argv)}`, {out['elapsed_s'] / 60:.0f} minutes in all; "
        f"load average after: {' '.join(f'{v:.2f}' for v in out['loadavg'])}.\n\n"
        f"The day lasted {scale['duration_s']:.0f} s ({out['requests']:,} streamed chat requests of "
        f"{args['max_tokens']} tokens, peak {args['peak_rps']:g} req/s); every delay divided by "
        f"{scale['infra']:.1f} (cold start 45 s → {45 / scale['infra']:.1f} s of simulated loading, warm 7 s → "
        f"{7 / scale['infra']:.1f} s; SkyServe 300 s / 1200 s → {300 / scale['infra']:.0f} s / "
        f"{1200 / scale['infra']:.0f} s). Nodes: `vllm_sim --max-num-seqs {args['max_num_seqs']} "
        f"--itl-ms {args['itl_ms']:g}`; each policy aims at {args['target_ongoing']} requests per node.\n"
    )
    for extra in out.get("extra_runs", []):
        head += (
            f"\nRows {', '.join(LABELS.get(p, p) for p in extra['policies'])} come from a separate run at "
            f"{time.strftime('%H:%M UTC', time.gmtime(extra['started']))} "
            f"(`bench/autoscale_bench.py {' '.join(extra.get('argv') or [])}`, load average after: "
            f"{' '.join(f'{v:.2f}' for v in extra['loadavg'])}).\n"
        )
    rows = [
        "| policy | node-seconds | vs static | TTFT p50 / p95 | p95 outside 1st burst | failed | held (wait p50 / max) "
        "| max nodes | cold / warm start (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    static_ns = out["results"].get("static", {}).get("summary", {}).get("node_seconds")
    for name, r in out["results"].items():
        s = r["summary"]
        share = f"{s['node_seconds'] / static_ns:.0%}" if static_ns else "–"
        held = f"{s['held']} ({_ms(s['held_wait_p50_ms'])} / {_ms(s['held_wait_max_ms'])})" if s["held"] else "0"
        failed = f"{s['failed']}" + (
            " (" + ", ".join(f"{k}: {v}" for k, v in sorted(s["failures"].items())[:3]) + ")" if s["failures"] else ""
        )
        rows.append(
            f"| {LABELS.get(name, name)} | {s['node_seconds']:,.0f} | {share} | {_ms(s['ttft_p50_ms'])} / "
            f"{_ms(s['ttft_p95_ms'])} | {_ms(s['ttft_p95_outside_first_burst_ms'])} | {failed} | {held} | "
            f"{s['max_live']} | {_s(s['cold_starts_s'])} / {_s(s['warm_starts_s'])} |"
        )
    return head + "\n" + "\n".join(rows) + "\n\nTargets (issue #13):\n\n" + "\n".join(targets(out)) + "\n"


def chart(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = out["results"]
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 2.8 * len(results)), sharex=True, squeeze=False)
    duration = out["scale"]["duration_s"]
    top = max((s["live"] for r in results.values() for s in r["samples"]), default=1) + 0.5
    for ax, (name, r) in zip(axes[:, 0], results.items(), strict=True):
        samples = r["samples"]
        hours = [24 * s["t"] / duration for s in samples]
        ax.step(hours, [s["live"] for s in samples], where="post", label="nodes (live)", color="tab:blue")
        ax.step(hours, [s["ready"] for s in samples], where="post", label="nodes ready", color="tab:green")
        if any(s.get("desired") is not None for s in samples):
            ax.step(
                hours,
                [s.get("desired") or 0 for s in samples],
                where="post",
                label="desired",
                color="tab:gray",
                linestyle=":",
            )
        ax.set_ylabel("nodes")
        ax.set_ylim(-0.2, top)  # the same scale in every panel
        queue = ax.twinx()
        queue.plot(
            hours,
            [s["held"] + s["waiting"] for s in samples],
            color="tab:red",
            alpha=0.7,
            label="queue (held + vLLM waiting)",
        )
        queue.plot(
            hours,
            [s["offered_rps"] for s in samples],
            color="tab:orange",
            alpha=0.5,
            linestyle="--",
            label="offered req/s",
        )
        queue.set_ylabel("requests, req/s")
        s = r["summary"]
        ax.set_title(
            f"{LABELS.get(name, name)}: {s['node_seconds']:,.0f} node-s, TTFT p95 {_ms(s['ttft_p95_ms'])}, "
            f"{s['failed']} failed, {s['held']} held",
            fontsize=10,
        )
        lines = ax.get_legend_handles_labels()
        more = queue.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("hour of the replayed day")
    axes[-1, 0].set_xlim(0, 24)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(path: Path, table: str) -> None:
    text = path.read_text()
    block = f"{START}\n{table.rstrip()}\n\n![replicas and queue over the day](img/autoscale-bench.png)\n{END}"
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Autoscaling replay\n\n" + block + "\n"
    path.write_text(text)

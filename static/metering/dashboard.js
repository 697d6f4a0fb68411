/* The staff dashboard: draws the numbers embedded in the page (#dashboard-data), then refetches
 * them from data-url every data-refresh-seconds. Each chart's <canvas> gets data-drawn="1",
 * data-points (how many x values) and data-total (sum of every value drawn) once Chart.js has
 * rendered it: the browser test reads those. Money arrives in integer micro-dollars. */
(function () {
  "use strict";
  const root = document.getElementById("cl-dashboard");
  if (!root || typeof Chart === "undefined") { return; }
  const charts = {};
  const colors = ["#417690", "#ba2121", "#79aec8", "#e0a030", "#2e7d32", "#7b5ea7", "#8c8c8c"];

  const drawnPlugin = {
    id: "clDrawn",
    afterRender(chart) {
      const canvas = chart.canvas;
      let total = 0;
      for (const ds of chart.data.datasets) {
        for (const v of ds.data) { total += Number(v) || 0; }
      }
      canvas.dataset.drawn = "1";
      canvas.dataset.points = String(chart.data.labels.length);
      canvas.dataset.total = String(total);
    },
  };

  function usd(micros, digits) {
    const value = (Number(micros) || 0) / 1e6;
    const places = digits !== undefined ? digits : (Math.abs(value) < 10 && value !== 0 ? 4 : 2);
    return (value < 0 ? "-$" : "$") + Math.abs(value).toLocaleString("en-US", {minimumFractionDigits: places, maximumFractionDigits: places});
  }
  function num(value) { return value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US"); }
  function ms(value) { return value === null || value === undefined ? "–" : Number(value).toFixed(1); }
  function pct(value) { return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + " %"; }
  function hours(value) { return value === null || value === undefined ? "–" : Number(value).toFixed(2); }

  function fillTable(id, rows, cells) {
    const body = document.querySelector("#" + id + " tbody");
    const fragment = document.createDocumentFragment();
    for (const row of rows) {
      const tr = document.createElement("tr");
      for (const [text, cls] of cells(row)) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) { td.className = cls; }
        tr.appendChild(td);
      }
      fragment.appendChild(tr);
    }
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = document.querySelectorAll("#" + id + " thead th").length;
      td.textContent = "No data yet.";
      tr.appendChild(td);
      fragment.appendChild(tr);
    }
    body.replaceChildren(fragment);
    document.getElementById(id).dataset.rows = String(rows.length);
  }

  function chart(id, type, labels, datasets, options) {
    const existing = charts[id];
    if (existing) {
      existing.data.labels = labels;
      existing.data.datasets.forEach((ds, i) => { ds.data = datasets[i].data; });
      existing.update("none");
      return;
    }
    datasets.forEach((ds, i) => {
      ds.borderColor = ds.borderColor || colors[i % colors.length];
      ds.backgroundColor = ds.backgroundColor || colors[i % colors.length];
      ds.pointRadius = ds.pointRadius !== undefined ? ds.pointRadius : 0;
      ds.borderWidth = ds.borderWidth || 1.5;
    });
    charts[id] = new Chart(document.getElementById(id), {
      type: type,
      data: {labels: labels, datasets: datasets},
      options: Object.assign({
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: {mode: "index", intersect: false},
        scales: {x: {ticks: {maxTicksLimit: 12, autoSkip: true}}, y: {beginAtZero: true}},
      }, options || {}),
      plugins: [drawnPlugin],
    });
  }

  function figures(id, items) {
    const box = document.getElementById(id);
    box.replaceChildren(...items.map(([label, value]) => {
      const div = document.createElement("div");
      const b = document.createElement("b");
      b.textContent = value;
      div.appendChild(b);
      div.appendChild(document.createTextNode(label));
      return div;
    }));
  }

  function render(data) {
    const pm = data.per_minute;
    figures("traffic-totals", [
      ["requests", num(pm.totals.requests)], ["tokens", num(pm.totals.tokens)], ["errors", num(pm.totals.errors)],
    ]);
    chart("chart-traffic", "line", pm.labels, [
      {label: "requests / min", data: pm.requests},
      {label: "errors / min", data: pm.errors},
    ]);
    chart("chart-tokens", "line", pm.labels, [{label: "tokens / min", data: pm.tokens}]);

    const pd = data.per_day;
    chart("chart-spend", "bar", pd.labels, [
      {label: "spend (revenue)", data: pd.spend_micros.map((m) => m / 1e6)},
      {label: "GPU cost", data: pd.gpu_cost_micros.map((m) => m / 1e6)},
    ]);

    fillTable("table-top-tenants", data.top_tenants, (r) => [
      [r.tenant], [num(r.requests), "num"], [num(r.tokens), "num"], [num(r.errors), "num"], [usd(r.spend_micros), "num"],
    ]);
    fillTable("table-top-models", data.top_models, (r) => [
      [r.model], [num(r.requests), "num"], [num(r.tokens), "num"], [num(r.errors), "num"], [usd(r.spend_micros), "num"],
      [ms(r.ttft_p50_ms) + " / " + ms(r.ttft_p95_ms), "num"], [ms(r.latency_p50_ms) + " / " + ms(r.latency_p95_ms), "num"],
    ]);
    const tm = data.top_models;
    chart("chart-latency", "bar", tm.map((r) => r.model), [
      {label: "TTFT p50", data: tm.map((r) => r.ttft_p50_ms || 0)},
      {label: "TTFT p95", data: tm.map((r) => r.ttft_p95_ms || 0)},
      {label: "latency p50", data: tm.map((r) => r.latency_p50_ms || 0)},
      {label: "latency p95", data: tm.map((r) => r.latency_p95_ms || 0)},
    ]);

    const fleet = data.fleet;
    figures("fleet-figures", [
      ["live nodes", num(fleet.live)], ["cost per hour now", usd(fleet.cost_per_hour_micros, 2)],
    ]);
    chart("chart-fleet", "bar", fleet.by_status.map((s) => s.label), [
      {label: "nodes", data: fleet.by_status.map((s) => s.count)},
    ], {plugins: {legend: {display: false}}});
    const groups = [];
    for (let i = 0; i < Math.max(fleet.by_accelerator.length, fleet.by_placement.length); i++) {
      groups.push([fleet.by_accelerator[i], fleet.by_placement[i]]);
    }
    fillTable("table-fleet-groups", groups, ([a, p]) => [
      [a ? a.name : ""], [a ? num(a.count) : "", "num"], [p ? p.name : ""], [p ? num(p.count) : "", "num"],
    ]);
    fillTable("table-fleet-nodes", fleet.nodes, (n) => [
      [n.name], [n.model], [n.status], [n.accelerator || "–"], [n.placement + (n.spot ? " (spot)" : "")],
      [usd(n.hourly_cost_micros, 2), "num"], [pct(n.kv_cache_usage), "num"], [num(n.running), "num"], [num(n.waiting), "num"],
    ]);
    fillTable("table-cold-starts", data.cold_starts, (c) => [
      [c.model], [c.accelerator], [c.median_seconds.toFixed(1) + " s", "num"], [num(c.samples), "num"],
    ]);
    document.getElementById("economics-days").textContent = String(data.economics.days);
    fillTable("table-economics", data.economics.rows, (e) => [
      [e.model], [usd(e.revenue_micros), "num"], [usd(e.gpu_cost_micros), "num"], [usd(e.storage_cost_micros), "num"],
      [usd(e.margin_micros), e.margin_micros < 0 ? "num cl-neg" : "num"], [num(e.tokens), "num"],
      [e.gpu_cost_per_mtok_micros === null ? "–" : usd(e.gpu_cost_per_mtok_micros), "num"], [pct(e.utilisation), "num"],
      [hours(e.gpu_hours), "num"], [hours(e.idle_gpu_hours), "num"], [usd(e.storage_month_micros), "num"],
    ]);
    document.getElementById("dashboard-updated").textContent = data.generated_at;
    document.getElementById("dashboard-rollups-until").textContent = data.rollups_until || "(none yet)";
    root.dataset.updatedAt = data.generated_at;
  }

  const error = document.getElementById("dashboard-error");
  async function refresh() {
    try {
      const response = await fetch(root.dataset.url, {credentials: "same-origin", headers: {"Accept": "application/json"}});
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      render(await response.json());
      error.hidden = true;
    } catch (exc) {
      error.textContent = "Refresh failed (" + exc.message + "); showing the last numbers.";
      error.hidden = false;
    }
  }

  render(JSON.parse(document.getElementById("dashboard-data").textContent));
  const every = Math.max(5, Number(root.dataset.refreshSeconds) || 30) * 1000;
  window.setInterval(refresh, every);
})();

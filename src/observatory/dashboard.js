// The observatory dashboard: hash routes #/ (queries), #/query/<id> (stage graph, stages,
// spans), #/nodes (host metrics per node over time). Plain DOM and SVG, no dependencies.
"use strict";

const app = document.getElementById("app");
const SVG = "http://www.w3.org/2000/svg";

async function api(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") node.onclick = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const ms = (ns) => `${(ns / 1e6).toFixed(1)} ms`;
const when = (ns) => new Date(ns / 1e6).toLocaleString();
const badge = (status) => el("span", { class: `badge ${status}` }, status);

function panel(title, ...children) {
  return el("section", { class: "panel" }, el("h2", {}, title), ...children);
}

async function queriesPage() {
  const { queries } = await api("/api/v1/queries");
  if (!queries.length) return panel("Queries", el("div", { class: "empty" }, "No query has reported yet."));
  const rows = queries.map((q) =>
    el("tr", { class: "link", "data-query": q.query_id, onclick: () => (location.hash = `#/query/${q.query_id}`) },
      el("td", {}, el("code", {}, q.query_id)), el("td", {}, badge(q.status)), el("td", {}, q.user || "—"),
      el("td", {}, q.query_type || ""), el("td", {}, when(q.start_ns)), el("td", {}, ms(q.end_ns - q.start_ns)), el("td", {}, q.spans)));
  return panel("Queries", el("table", { id: "queries" },
    el("thead", {}, el("tr", {}, ...["Query", "Status", "User", "Type", "Started", "Duration", "Spans"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows)));
}

// The stage graph: a stage is drawn one column right of the stages it reads; every edge is
// a shuffle. Each box shows the stage's tasks, workers, rows, bytes shuffled and time.
function stageGraph(stages) {
  const w = 250, h = 92, gapX = 70, gapY = 22, pad = 20;
  const byId = new Map(stages.map((s) => [s.stage, s]));
  const depth = new Map();
  const depthOf = (s) => {
    if (!depth.has(s.stage)) {
      depth.set(s.stage, 0);
      depth.set(s.stage, Math.max(0, ...(s.inputs || []).filter((i) => byId.has(i)).map((i) => depthOf(byId.get(i)) + 1)));
    }
    return depth.get(s.stage);
  };
  stages.forEach(depthOf);
  const columns = [];
  stages.forEach((s) => (columns[depth.get(s.stage)] ||= []).push(s));
  const pos = new Map();
  columns.forEach((col, c) => col.forEach((s, r) => pos.set(s.stage, { x: pad + c * (w + gapX), y: pad + r * (h + gapY) })));
  const width = pad * 2 + columns.length * w + Math.max(0, columns.length - 1) * gapX;
  const height = pad * 2 + Math.max(...columns.map((c) => c.length)) * (h + gapY) - gapY;
  const svg = el("svg:svg", { class: "stage-graph", width, height, viewBox: `0 0 ${width} ${height}` });
  svg.append(el("svg:defs", {}, el("svg:marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
    el("svg:path", { d: "M0,0 L10,5 L0,10 z", fill: "#8b98a5" }))));
  const fmtBytes = (b) => (b >= 1 << 20 ? `${(b / (1 << 20)).toFixed(1)} MiB` : b >= 1024 ? `${(b / 1024).toFixed(1)} KiB` : `${b} B`);
  stages.forEach((s) => {
    const { x, y } = pos.get(s.stage);
    for (const i of s.inputs || []) {
      const from = pos.get(i);
      if (from) svg.append(el("svg:path", { class: "edge", d: `M${from.x + w},${from.y + h / 2} C${from.x + w + gapX / 2},${from.y + h / 2} ${x - gapX / 2},${y + h / 2} ${x - 4},${y + h / 2}` }));
    }
    const workers = s.workers || [];
    svg.append(el("svg:g", { class: `stage${s.failed_tasks ? " failed" : ""}`, "data-stage": s.stage },
      el("svg:title", {}, s.label || ""),
      el("svg:rect", { x, y, width: w, height: h }),
      el("svg:text", { x: x + 12, y: y + 22, "font-weight": 600 }, `Stage ${s.stage}`, el("svg:tspan", { class: "muted", dx: 8 }, s.fused ? "run inside the result task" : `${s.tasks ?? "?"} task(s) → ${s.output ?? ""}`)),
      el("svg:text", { x: x + 12, y: y + 42 }, `${workers.length} worker${workers.length === 1 ? "" : "s"}: ${workers.join(", ")}`),
      el("svg:text", { x: x + 12, y: y + 60 }, `${s.rows ?? 0} rows · ${fmtBytes(s.bytes_shuffled ?? 0)} shuffled`),
      el("svg:text", { x: x + 12, y: y + 78, class: "muted" }, `${(s.time_ms ?? 0).toFixed(1)} ms · ${s.spans ?? 0} spans`)));
  });
  return svg;
}

async function queryPage(id) {
  const q = await api(`/api/v1/query/${id}`);
  const spans = q.spans.map((s) => el("tr", {},
    el("td", {}, s.name), el("td", {}, s.instance), el("td", {}, s.attributes["polars.stage"] ?? ""),
    el("td", {}, ms(s.end_ns - s.start_ns)), el("td", {}, s.status_code === 2 ? badge("failed") : badge("ok")),
    el("td", { class: "muted" }, s.attributes["polars.rows"] ?? "")));
  const status = q.status === "Success" ? "ok" : q.status === "Failed" ? "failed" : q.status;
  return el("div", {},
    panel(`Query ${q.query_id}`, el("p", {}, badge(status), "  ", when(q.start_ns), " · ", ms(q.end_ns - q.start_ns),
      ` · ${q.query_type} · ${q.finished_stages.length}/${q.total_num_stages} stages · ${q.total_bytes_shuffled ?? 0} bytes shuffled`,
      " · nodes: ", q.workers.join(", "))),
    panel("Stage graph", q.stages.length ? stageGraph(q.stages) : el("div", { class: "empty" }, "No stage reported.")),
    panel("Physical plan (stages)", q.plans.physical ? el("pre", { id: "plan-physical" }, q.plans.physical) : el("div", { class: "empty" }, "The query ran whole on one worker.")),
    panel("Logical plan (optimized)", q.plans.ir ? el("pre", { id: "plan-ir" }, q.plans.ir) : el("div", { class: "empty" }, "Not reported.")),
    panel("Spans", el("table", {}, el("thead", {}, el("tr", {}, ...["Span", "Node", "Stage", "Duration", "Status", "Rows"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...spans))));
}

// A line chart of one series (points: [{time_ns, value}]).
function chart(title, points, format) {
  const W = 360, H = 140, P = 28;
  const svg = el("svg:svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  svg.append(el("svg:text", { x: 4, y: 14 }, title));
  if (points.length < 2) { svg.append(el("svg:text", { x: 4, y: 40, class: "muted" }, "collecting…")); return svg; }
  const t0 = points[0].time_ns, t1 = points[points.length - 1].time_ns;
  const max = Math.max(...points.map((p) => p.value)) || 1;
  const x = (t) => P + ((t - t0) / (t1 - t0 || 1)) * (W - P - 8), y = (v) => H - 18 - (v / max) * (H - 40);
  svg.append(el("svg:line", { class: "axis", x1: P, y1: H - 18, x2: W - 8, y2: H - 18 }));
  svg.append(el("svg:path", { class: "series", stroke: "#3fb6ff", d: points.map((p, i) => `${i ? "L" : "M"}${x(p.time_ns)},${y(p.value)}`).join(" ") }));
  svg.append(el("svg:text", { x: W - 8, y: 14, "text-anchor": "end", class: "muted" }, format(points[points.length - 1].value)));
  return svg;
}

async function nodesPage() {
  const { nodes } = await api("/api/v1/nodes");
  if (!nodes.length) return panel("Nodes", el("div", { class: "empty" }, "No node sends host metrics (enable [monitoring])."));
  const since = (Date.now() - 15 * 60e3) * 1e6;
  const cards = await Promise.all(nodes.map(async (n) => {
    const series = async (name) => (await api(`/api/v1/metrics?node=${encodeURIComponent(n.node)}&name=${name}&since_ns=${since}`)).points;
    const [cpu, mem, live, asked] = await Promise.all([
      series("host.cpu.utilization"), series("host.memory.used"),
      series("polars.scaling.live_workers"), series("polars.scaling.desired_workers"),
    ]);
    const charts = [chart("CPU", cpu, (v) => `${(v * 100).toFixed(0)} %`), chart("Memory used", mem, (v) => `${(v / 2 ** 30).toFixed(2)} GiB`)];
    // A scheduler with [scaling] on: its workers, and what it last asked the scaler for.
    if (live.length || asked.length) {
      charts.push(chart("Workers live (autoscaling)", live, (v) => `${v}`), chart("Workers asked of the scaler", asked, (v) => `${v}`));
    }
    return panel(n.node, ...charts);
  }));
  return el("div", { class: "grid", id: "nodes" }, ...cards);
}

async function render() {
  const route = location.hash.replace(/^#/, "") || "/";
  document.getElementById("nav-queries").classList.toggle("active", !route.startsWith("/nodes"));
  document.getElementById("nav-nodes").classList.toggle("active", route.startsWith("/nodes"));
  try {
    const m = route.match(/^\/query\/([0-9a-f-]+)$/);
    const page = m ? await queryPage(m[1]) : route.startsWith("/nodes") ? await nodesPage() : await queriesPage();
    app.replaceChildren(page);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    app.replaceChildren(panel("Error", el("pre", {}, String(e))));
  }
}

window.addEventListener("hashchange", render);
render();
setInterval(() => { if (!location.hash.startsWith("#/query/")) render(); }, 5000);

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
      el("td", {}, el("code", {}, q.query_id)), el("td", {}, badge(q.status)),
      el("td", {}, when(q.start_ns)), el("td", {}, ms(q.end_ns - q.start_ns)), el("td", {}, q.spans)));
  return panel("Queries", el("table", { id: "queries" },
    el("thead", {}, el("tr", {}, ...["Query", "Status", "Started", "Duration", "Spans"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows)));
}

// Stages as boxes left to right, each naming its workers; edges follow stage order (every
// edge of the stage graph is a shuffle).
function stageGraph(stages) {
  const w = 220, h = 74, gap = 70, pad = 20;
  const width = pad * 2 + stages.length * w + Math.max(0, stages.length - 1) * gap;
  const svg = el("svg:svg", { class: "stage-graph", width, height: h + pad * 2, viewBox: `0 0 ${width} ${h + pad * 2}` });
  svg.append(el("svg:defs", {}, el("svg:marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
    el("svg:path", { d: "M0,0 L10,5 L0,10 z", fill: "#8b98a5" }))));
  stages.forEach((s, i) => {
    const x = pad + i * (w + gap), y = pad;
    if (i > 0) svg.append(el("svg:path", { class: "edge", d: `M${x - gap},${y + h / 2} L${x - 4},${y + h / 2}` }));
    svg.append(el("svg:g", { class: "stage", "data-stage": s.stage },
      el("svg:rect", { x, y, width: w, height: h }),
      el("svg:text", { x: x + 12, y: y + 24, "font-weight": 600 }, `Stage ${s.stage}`),
      el("svg:text", { x: x + 12, y: y + 44 }, `${s.workers.length} worker${s.workers.length === 1 ? "" : "s"}: ${s.workers.join(", ")}`),
      el("svg:text", { x: x + 12, y: y + 62, class: "muted" }, `${s.spans} spans`)));
  });
  return svg;
}

async function queryPage(id) {
  const q = await api(`/api/v1/query/${id}`);
  const spans = q.spans.map((s) => el("tr", {},
    el("td", {}, s.name), el("td", {}, s.instance), el("td", {}, s.attributes["polars.stage"] ?? ""),
    el("td", {}, ms(s.end_ns - s.start_ns)), el("td", {}, s.status_code === 2 ? badge("failed") : badge("ok")),
    el("td", { class: "muted" }, s.attributes["polars.rows"] ?? "")));
  return el("div", {},
    panel(`Query ${q.query_id}`, el("p", {}, badge(q.status), "  ", when(q.start_ns), " · ", ms(q.end_ns - q.start_ns),
      " · nodes: ", q.workers.join(", "))),
    panel("Stage graph", q.stages.length ? stageGraph(q.stages) : el("div", { class: "empty" }, "No stage reported.")),
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
    const [cpu, mem] = await Promise.all([series("host.cpu.utilization"), series("host.memory.used")]);
    return panel(n.node, chart("CPU", cpu, (v) => `${(v * 100).toFixed(0)} %`), chart("Memory used", mem, (v) => `${(v / 2 ** 30).toFixed(2)} GiB`));
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

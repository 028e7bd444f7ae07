// stepd web pages: relative times, confirm prompts, live pages, and the flow graph.
"use strict";

function relative(ms) {
  const delta = (Date.now() - ms) / 1000, s = Math.abs(delta);
  if (s < 10) return "just now";
  let text;
  if (s < 60) text = Math.floor(s) + " s";
  else if (s < 3600) text = Math.floor(s / 60) + " min";
  else if (s < 86400) text = Math.floor(s / 3600) + " h";
  else if (s < 30 * 86400) text = Math.floor(s / 86400) + " d";
  else return new Date(ms).toLocaleDateString();
  return delta > 0 ? text + " ago" : "in " + text;
}

function refreshTimes(root) {
  for (const el of root.querySelectorAll("time[data-ms]")) {
    const ms = Number(el.dataset.ms);
    el.textContent = relative(ms);
    el.title = new Date(ms).toLocaleString();
  }
}

// Forms with data-confirm on their button ask first. Once a form is on its way, the live
// part of the page is no longer swapped: a swap arriving with the click could take the
// form being submitted out of the page, and the answer (a new page) is coming anyway.
let submitting = false;
document.addEventListener("submit", (event) => {
  const button = event.submitter;
  if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) {
    event.preventDefault();
  }
  if (!event.defaultPrevented) submitting = true;
});
window.addEventListener("pageshow", () => { submitting = false; });  // back from the cache

// Live pages (a workflow, the inbox, the list): follow the page's event stream and swap in
// the fresh page's #live part. A form someone is filling in, and folds they opened, stay.
function editing(el) {
  if (el.contains(document.activeElement) && document.activeElement.matches("input, textarea, select")) return true;
  for (const field of el.querySelectorAll("input:not([type=hidden]), textarea")) {
    if (field.value !== field.defaultValue) return true;
  }
  for (const option of el.querySelectorAll("option")) {
    if (option.selected !== option.defaultSelected) return true;
  }
  return false;
}

function swap(current, fresh) {
  const open = new Set([...current.querySelectorAll("details[id][open]")].map((d) => d.id));
  const closed = new Set([...current.querySelectorAll("details[id]:not([open])")].map((d) => d.id));
  const kept = [...current.querySelectorAll("[data-keep][id]")].filter(editing);
  current.replaceChildren(...fresh.childNodes);
  for (const old of kept) {
    const replacement = document.getElementById(old.id);
    if (replacement) replacement.replaceWith(old);
  }
  for (const d of current.querySelectorAll("details[id]")) {
    if (open.has(d.id)) d.open = true;
    else if (closed.has(d.id)) d.open = false;
  }
}

function follow(live) {
  const source = new EventSource(live.dataset.events);
  const gap = Number(live.dataset.throttle || 0);  // ms between reloads on busy streams
  let busy = false, again = false, last = 0;
  async function reload() {
    if (submitting) return;
    if (busy) { again = true; return; }
    busy = true;
    try {
      const wait = last + gap - Date.now();
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
      last = Date.now();
      const response = await fetch(location.pathname + location.search, { headers: { Accept: "text/html" } });
      if (response.redirected || !response.ok) { source.close(); return; }
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("live");
      const current = document.getElementById("live");
      if (!fresh || !current || submitting) return;
      swap(current, fresh);
      current.dataset.status = fresh.dataset.status || "";
      const count = page.getElementById("inbox-count"), mine = document.getElementById("inbox-count");
      if (mine && count) mine.textContent = count.textContent;
      else if (mine) mine.remove();
      else if (count) document.querySelector("nav a[href='/ui/approvals']").append(" ", count);
      refreshTimes(current);
      drawGraph();
      if (!fresh.dataset.events) source.close();  // finished: nothing more will come
    } finally {
      busy = false;
      if (again) { again = false; reload(); }
    }
  }
  source.onmessage = reload;
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) source.close(); };
}

// -- the flow graph ------------------------------------------------------------------------
// The page embeds the graph as JSON (#graph-data: nodes, edges, groups; see
// daemon/web/graph.py); dagre (vendored, dagre.min.js) lays it out and it is drawn as SVG.
const SVG = "http://www.w3.org/2000/svg";
const GROUP_LABEL = 18;  // room above a group's contents for its name
let measureCanvas = null;

function textWidth(text, font) {
  measureCanvas = measureCanvas || document.createElement("canvas");
  const ctx = measureCanvas.getContext("2d");
  ctx.font = font;
  return ctx.measureText(text).width;
}

function svgEl(name, attrs, parent) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function nodeLines(node) {
  if (node.kind === "start" || node.kind === "end" || node.kind === "join") return [];
  const lines = [[node.label, "label"]];
  if (node.detail) lines.push([node.detail, "detail"]);
  if (node.counts) lines.push([node.counts, "counts"]);
  return lines;
}

function nodeSize(node) {
  if (node.kind === "join") return [14, 14];
  if (node.kind === "start" || node.kind === "end") return [22, 22];
  let width = 0;
  for (const [text, cls] of nodeLines(node)) {
    width = Math.max(width, textWidth(text, cls === "label" ? "600 13px system-ui, sans-serif" : "12px system-ui, sans-serif"));
  }
  return [Math.max(96, Math.ceil(width) + 28), 14 + 17 * nodeLines(node).length];
}

function edgePath(points) {
  // Straight segments with rounded corners through dagre's points.
  let d = `M${points[0].x},${points[0].y}`;
  for (let i = 1; i < points.length - 1; i++) {
    const p = points[i], n = points[i + 1];
    const mx = (p.x + n.x) / 2, my = (p.y + n.y) / 2;
    d += ` Q${p.x},${p.y} ${mx},${my}`;
  }
  const last = points[points.length - 1];
  return d + ` L${last.x},${last.y}`;
}

function drawGraph() {
  const holder = document.getElementById("graph");
  const data = document.getElementById("graph-data");
  if (!holder || !data || typeof dagre === "undefined") return;
  let spec;
  try { spec = JSON.parse(data.textContent); } catch (e) { return; }
  const g = new dagre.graphlib.Graph({ compound: true, multigraph: true });
  g.setGraph({ rankdir: "TB", nodesep: 28, ranksep: 42, edgesep: 14, marginx: 12, marginy: 12 + GROUP_LABEL });
  g.setDefaultEdgeLabel(() => ({}));
  for (const group of spec.groups) g.setNode(group.id, { group });
  for (const node of spec.nodes) {
    const [width, height] = nodeSize(node);
    g.setNode(node.id, { node, width, height });
  }
  for (const group of spec.groups) if (group.parent) g.setParent(group.id, group.parent);
  for (const node of spec.nodes) if (node.parent) g.setParent(node.id, node.parent);
  spec.edges.forEach((edge, i) => {
    const label = edge.label || "";
    const attrs = { edge, minlen: 1 };
    if (label) Object.assign(attrs, { label, width: textWidth(label, "12px system-ui, sans-serif") + 10, height: 18, labelpos: "c" });
    if (edge.kind === "error") attrs.weight = 0;  // keep the main path straight
    g.setEdge(edge.source, edge.target, attrs, "e" + i);
  });
  dagre.layout(g);

  const graph = g.graph();
  const width = Math.ceil(graph.width), height = Math.ceil(graph.height);
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": "The flow: states and transitions, coloured by status", class: "flow" });
  const defs = svgEl("defs", {}, svg);
  const marker = svgEl("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, defs);
  svgEl("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow-head" }, marker);

  // Groups, outermost first so inner ones draw on top.
  const depth = (id) => { let d = 0; for (let p = g.parent(id); p; p = g.parent(p)) d++; return d; };
  const groups = spec.groups.map((gr) => gr.id).sort((a, b) => depth(a) - depth(b));
  for (const id of groups) {
    const box = g.node(id), group = box.group;
    const el = svgEl("g", { class: `g-group k-${group.kind} s-${group.status}`, "data-state": group.label }, svg);
    const top = box.y - box.height / 2 - GROUP_LABEL;
    svgEl("rect", { x: box.x - box.width / 2, y: top, width: box.width, height: box.height + GROUP_LABEL, rx: 10 }, el);
    const title = svgEl("text", { x: box.x - box.width / 2 + 10, y: top + 13, class: "group-label" }, el);
    title.textContent = (group.kind === "branch" ? "branch " : group.kind === "map" ? "map " : "parallel ") + group.label;
  }
  for (const e of g.edges()) {
    const info = g.edge(e), edge = info.edge;
    const el = svgEl("g", { class: `g-edge k-${edge.kind}` }, svg);
    svgEl("path", { d: edgePath(info.points), "marker-end": "url(#arrow)" }, el);
    if (info.label) {
      const w = textWidth(info.label, "12px system-ui, sans-serif") + 8;
      svgEl("rect", { x: info.x - w / 2, y: info.y - 9, width: w, height: 18, rx: 4, class: "edge-label-bg" }, el);
      const t = svgEl("text", { x: info.x, y: info.y + 4, "text-anchor": "middle", class: "edge-label" }, el);
      t.textContent = info.label;
    }
  }
  for (const id of g.nodes()) {
    const box = g.node(id);
    if (!box.node) continue;
    const node = box.node;
    const parent = node.step ? svgEl("a", { href: `#step-${node.step}` }, svg) : svg;
    const el = svgEl("g", { class: `g-node k-${node.kind} s-${node.status}`, "data-state": node.state,
      "data-status": node.status, id: `node-${node.id}` }, parent);
    const tip = svgEl("title", {}, el);
    tip.textContent = node.state ? `${node.state}: ${node.status === "none" ? "not reached" : node.status}` : node.label;
    const x = box.x - box.width / 2, y = box.y - box.height / 2;
    if (node.kind === "start" || node.kind === "end" || node.kind === "join") {
      svgEl("circle", { cx: box.x, cy: box.y, r: box.width / 2 }, el);
      if (node.kind === "end") svgEl("circle", { cx: box.x, cy: box.y, r: box.width / 2 - 5, class: "inner" }, el);
      continue;
    }
    svgEl("rect", { x, y, width: box.width, height: box.height, rx: node.kind === "gate" || node.kind === "wait" ? 14 : 6 }, el);
    nodeLines(node).forEach(([text, cls], i) => {
      const t = svgEl("text", { x: box.x, y: y + 20 + 17 * i, "text-anchor": "middle", class: cls }, el);
      t.textContent = text;
    });
  }
  holder.replaceChildren(svg);
}

// A link to a step (a graph node) opens the folds the step's row is in.
function reveal() {
  const target = location.hash.startsWith("#step-") && document.getElementById(location.hash.slice(1));
  if (!target) return;
  for (let d = target.closest("details"); d; d = d.parentElement.closest("details")) d.open = true;
  target.scrollIntoView({ block: "center" });
}
window.addEventListener("hashchange", reveal);

document.addEventListener("DOMContentLoaded", () => {
  refreshTimes(document);
  drawGraph();
  reveal();
  setInterval(() => refreshTimes(document), 15000);
  const live = document.getElementById("live");
  if (live && live.dataset.events) follow(live);
});

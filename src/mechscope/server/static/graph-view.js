// mechscope graph explorer: the graph view, nodes by layer (rows) and token position (columns).
// Plain JavaScript, no dependencies; every text from a graph goes through textContent.

import { $, edgeColour, el, isPrunable, isShown, kindOf, rowOf, state, supernodeColour } from "./common.js";

const ROW_HEIGHT = { min: 22, max: 48 }; // rows fill the view's height within these bounds

const NODE_SPACING = 15;

const MIN_COLUMN = 30; // px; columns then widen to fill the view when the graph is narrower
const MIN_SQUEEZE = 0.6; // a graph wider than the view is narrowed at most this much, then scrolls

const MARGIN = { left: 96, right: 72, top: 64, bottom: 72 }; // room above for the logits' slanted labels

const MAX_EDGES = 2000; // strongest edges drawn at once (all edges of the focused node are drawn): more is a tangle

const N_LABELLED = 10; // the most influential visible features get their label on the canvas, as every logit does

function computeVisible() {
  const pinned = new Set(state.pinned);
  const showErrors = $("show-errors").checked;
  state.visible = new Set();
  for (const node of state.graph.nodes) {
    const kind = kindOf(node);
    let show = !isPrunable(node) || node.influence === null || node.influence === undefined ||
      node.influence <= state.threshold + 1e-9;
    if (kind === "error" && !showErrors) show = false;
    if (show || pinned.has(node.node_id)) state.visible.add(node.node_id);
  }
}

// The largest influence threshold at which the graph fits the view's width without scrolling (its
// columns squeezed at most to MIN_SQUEEZE), and at most `cap`: a graph opens there. Column widths
// follow computeLayout: the most crowded cell of each position sets its width.
export function fittingThreshold(cap) {
  const room = $("graph-view").clientWidth - MARGIN.left - MARGIN.right;
  const nPos = state.graph.metadata.prompt_tokens.length;
  const showErrors = $("show-errors").checked;
  const nodes = state.graph.nodes.filter((n) => showErrors || kindOf(n) !== "error");
  const fits = (t) => {
    const counts = new Map();
    for (const n of nodes) {
      if (isPrunable(n) && n.influence !== null && n.influence !== undefined && n.influence > t + 1e-9) continue;
      const key = `${n.ctx_idx},${rowOf(n)}`;
      counts.set(key, (counts.get(key) || 0) + 1);
    }
    const widths = new Array(nPos).fill(MIN_COLUMN);
    for (const [key, count] of counts) {
      const pos = +key.split(",")[0];
      widths[pos] = Math.max(widths[pos], count * NODE_SPACING + 12);
    }
    return widths.reduce((a, b) => a + b, 0) * MIN_SQUEEZE <= room;
  };
  const candidates = [...new Set(nodes.filter((n) => isPrunable(n) && n.influence !== null && n.influence !== undefined)
    .map((n) => n.influence))].filter((t) => t <= cap).sort((a, b) => a - b);
  let lo = 0, hi = candidates.length - 1, best = candidates.length ? candidates[0] : cap;
  while (lo <= hi) { // fitting is monotone in the threshold: fewer nodes, narrower columns
    const mid = (lo + hi) >> 1;
    if (fits(candidates[mid])) { best = candidates[mid]; lo = mid + 1; } else hi = mid - 1;
  }
  return best;
}

function computeLayout() {
  const available = $("graph-view").clientHeight - MARGIN.top - MARGIN.bottom;
  state.rowHeight = Math.max(ROW_HEIGHT.min, Math.min(ROW_HEIGHT.max, available / state.nRows));
  const nPos = state.graph.metadata.prompt_tokens.length;
  const cells = new Map(); // "pos,row" -> nodes
  for (const id of state.visible) {
    const node = state.byId.get(id);
    const key = `${node.ctx_idx},${rowOf(node)}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(node);
  }
  const widths = new Array(nPos).fill(MIN_COLUMN);
  for (const [key, nodes] of cells) {
    const pos = +key.split(",")[0];
    widths[pos] = Math.max(widths[pos], nodes.length * NODE_SPACING + 12);
  }
  const room = $("graph-view").clientWidth - MARGIN.left - MARGIN.right;
  const total = widths.reduce((a, b) => a + b, 0);
  // widen to fill the view, or narrow (nodes closer, down to MIN_SQUEEZE of their spacing) to fit it
  const scale = Math.max(MIN_SQUEEZE, room / total);
  widths.forEach((w, i) => { widths[i] = w * scale; });
  const starts = [MARGIN.left];
  for (let i = 0; i < nPos; i++) starts.push(starts[i] + widths[i]);
  state.pos = new Map();
  for (const [key, nodes] of cells) {
    const [pos, row] = key.split(",").map(Number);
    nodes.sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0) || (a.node_id < b.node_id ? -1 : 1));
    const step = widths[pos] / nodes.length;
    nodes.forEach((node, i) => {
      state.pos.set(node.node_id, { x: starts[pos] + step * (i + 0.5), y: yOfRow(row) });
    });
  }
  return { starts, widths, width: starts[nPos] + MARGIN.right, height: yOfRow(0) + state.rowHeight / 2 + MARGIN.bottom };
}

function yOfRow(row) {
  return MARGIN.top + (state.nRows - 1 - row) * state.rowHeight + state.rowHeight / 2;
}

export function render() {
  computeVisible();
  const { starts, widths, width, height } = computeLayout();
  const svg = $("graph-svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.replaceChildren();
  const labels = $("row-labels"); // layer names stay in view when the graph scrolls sideways
  labels.replaceChildren();
  labels.style.height = `${height}px`;
  for (let row = 0; row < state.nRows; row++) {
    const y = yOfRow(row);
    svg.append(el("svg:line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y, y2: y, class: "row-line" }));
    const name = row === 0 ? "Emb" : row === state.nRows - 1 ? "Logit" : `L${row - 1}`;
    const label = el("div", { class: "row-label" }, name);
    label.style.top = `${y - 8}px`; // CSSOM, not a style attribute: the page's CSP forbids inline styles
    labels.append(label);
  }
  // a chat prompt's tokens carry roles (metadata.chat.token_roles): template tokens are dimmed, the
  // user's and the assistant's words stand out, so the question and the assistant header are easy to find
  const roles = (state.graph.metadata.chat && state.graph.metadata.chat.token_roles) || [];
  state.graph.metadata.prompt_tokens.forEach((token, pos) => {
    const x = starts[pos] + widths[pos] / 2;
    const y = yOfRow(0) + state.rowHeight / 2 + 14;
    const role = roles[pos] ? ` role-${roles[pos]}` : "";
    const text = el("svg:text", { x, y, class: `axis-token${role}`, "text-anchor": "end", transform: `rotate(-45 ${x} ${y})` },
      token.replace(/\n/g, "⏎"));
    svg.append(text);
  });
  const colourOf = supernodeColours();
  for (const id of state.visible) svg.append(nodeElement(state.byId.get(id), colourOf.get(id)));
  for (const node of labelledNodes()) svg.append(canvasLabel(node));
  $("node-count").textContent = `${state.visible.size} of ${state.graph.nodes.length} nodes`;
  $("influence-value").textContent = state.threshold >= (state.maxInfluence ?? 1) - 1e-9
    ? `${state.threshold.toFixed(2)} (all)` : state.threshold.toFixed(2);
  const canvas = $("edge-canvas");
  const ratio = window.devicePixelRatio || 1;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  selectEdges();
  drawEdges();
}

// logits by their token, the strongest features by their label (or layer/feature): what a reader
// needs first without hovering
function labelledNodes() {
  const visible = [...state.visible].map((id) => state.byId.get(id));
  const features = visible.filter((n) => kindOf(n) === "feature" && n.influence !== null && n.influence !== undefined)
    .sort((a, b) => a.influence - b.influence).slice(0, N_LABELLED);
  return [...visible.filter((n) => kindOf(n) === "logit"), ...features];
}

function canvasLabel(node) {
  const { x, y } = state.pos.get(node.node_id);
  let text;
  if (kindOf(node) === "logit") {
    const match = /^Output "(.*)" \(p=/s.exec(node.clerp || "");
    text = match ? match[1] : node.clerp || node.node_id;
  } else {
    const [layer, feature] = node.node_id.split("_");
    text = node.clerp || `${layer}/${feature}`;
  }
  if (text.length > 24) text = `${text.slice(0, 23)}…`;
  const shown = text.replace(/\n/g, "⏎");
  if (kindOf(node) === "logit") { // slanted up and right: neighbouring logits do not overwrite each other
    return el("svg:text", { x: x + 2, y: y - 9, class: "canvas-label logit", transform: `rotate(-40 ${x + 2} ${y - 9})` }, shown);
  }
  return el("svg:text", { x: x + 8, y: y - 7, class: "canvas-label feature" }, shown);
}

function supernodeColours() {
  const colours = new Map();
  state.supernodes.forEach((entry, i) => {
    for (const id of entry.slice(1)) colours.set(id, supernodeColour(i));
  });
  return colours;
}

function nodeElement(node, colour) {
  const { x, y } = state.pos.get(node.node_id);
  const kind = kindOf(node);
  const g = el("svg:g", { class: `node ${kind}`, "data-node-id": node.node_id });
  let shape;
  if (kind === "feature") shape = el("svg:circle", { cx: x, cy: y, r: 5.5 });
  else if (kind === "logit") shape = el("svg:rect", { x: x - 6, y: y - 6, width: 12, height: 12, rx: 2 });
  else if (kind === "embedding") shape = el("svg:rect", { x: x - 6, y: y - 4, width: 12, height: 8 });
  else shape = el("svg:polygon", { points: `${x},${y - 6} ${x + 6},${y} ${x},${y + 6} ${x - 6},${y}` });
  shape.setAttribute("class", "shape");
  if (colour) shape.style.fill = colour;
  g.append(shape, el("svg:title", {}, node.clerp || node.node_id));
  if (node.is_target_logit) g.classList.add("target");
  g.addEventListener("mouseenter", () => state.on.focus(node.node_id));
  g.addEventListener("mouseleave", () => state.on.focus(null));
  g.addEventListener("click", () => state.on.pin(node.node_id));
  return g;
}

// The edges among visible nodes, strongest first, capped at MAX_EDGES; recomputed when the visible set changes.
function selectEdges() {
  const shown = state.graph.links.filter(isShown);
  state.maxAbs = shown.reduce((m, l) => Math.max(m, Math.abs(l.weight)), 1e-12);
  state.shownEdges = shown.length > MAX_EDGES
    ? shown.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_EDGES) : shown;
}

export function drawEdges() {
  const canvas = $("edge-canvas");
  const ctx = canvas.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const focus = state.focus || state.clicked;
  const draw = (links, fade) => {
    for (const link of links) {
      const a = state.pos.get(link.source);
      const b = state.pos.get(link.target);
      const strength = Math.abs(link.weight) / state.maxAbs;
      ctx.strokeStyle = edgeColour(link.weight);
      ctx.globalAlpha = fade ? 0.06 : 0.15 + 0.75 * Math.sqrt(strength);
      ctx.lineWidth = 0.4 + 3.6 * strength;
      ctx.beginPath();
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x, b.y);
      ctx.stroke();
    }
  };
  const touching = focus ? state.edgesOf.get(focus).filter(isShown) : [];
  draw(state.shownEdges, focus !== null);
  draw(touching, false);
  ctx.globalAlpha = 1;
  const neighbours = new Set(touching.flatMap((l) => [l.source, l.target]));
  for (const g of $("graph-svg").querySelectorAll(".node")) {
    const id = g.dataset.nodeId;
    g.classList.toggle("focus", id === focus);
    g.classList.toggle("pinned", state.pinned.includes(id));
    g.classList.toggle("selected", state.selected.has(id));
    g.classList.toggle("match", state.matches.has(id));
    g.classList.toggle("dim", focus !== null && !neighbours.has(id) && id !== focus);
  }
}

// Node tooltips follow label edits.
export function refreshTitles() {
  for (const g of $("graph-svg").querySelectorAll(".node")) {
    const node = state.byId.get(g.dataset.nodeId);
    g.querySelector("title").textContent = node.clerp || node.node_id;
  }
}

// mechscope graph explorer: an attribution graph (Neuronpedia exchange JSON) laid out by layer
// (rows) and token position (columns). Plain JavaScript with no dependencies: nothing is fetched
// but this server's own files and API. Every text from a graph goes through textContent.

const SVG = "http://www.w3.org/2000/svg";
const ROW_HEIGHT = { min: 22, max: 48 }; // rows fill the view's height within these bounds
const NODE_SPACING = 15;
const MIN_COLUMN = 72;
const MARGIN = { left: 96, right: 24, top: 20, bottom: 72 };
const MAX_EDGES = 15000; // strongest edges drawn at once (all edges of the focused node are drawn)
const SUPERNODE_COLOURS = ["#e11d48", "#7c3aed", "#0891b2", "#65a30d", "#c2410c", "#db2777", "#4f46e5", "#0d9488"];
const KIND = {
  "cross layer transcoder": "feature",
  "mlp reconstruction error": "error",
  "embedding": "embedding",
  "logit": "logit",
};

const state = {
  name: null, // graph name (path inside the served directory)
  graph: null,
  byId: new Map(), // node_id -> node
  edgesOf: new Map(), // node_id -> links touching it
  pos: new Map(), // node_id -> {x, y} of the current layout
  visible: new Set(),
  nRows: 0,
  rowHeight: ROW_HEIGHT.max,
  threshold: 1,
  pinned: [],
  selected: new Set(),
  supernodes: [], // [label, ...node_ids]
  focus: null, // hovered node id
  clicked: null, // last clicked node id
  shownEdges: [], // edges drawn, strongest first
  maxAbs: 1, // largest |weight| among the visible edges
  dirty: false,
  cards: new Map(), // "scan/layer/feature" -> Promise of card JSON
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text = null) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
}

function graphUrl(name) {
  return "/api/graphs/" + name.split("/").map(encodeURIComponent).join("/");
}

function setStatus(text, kind = "") {
  const s = $("status");
  s.textContent = text;
  s.className = kind;
}

function markDirty() {
  state.dirty = true;
  $("save").disabled = false;
  setStatus("Unsaved changes", "dirty");
}

// ------------------------------------------------------------------------------------ loading
async function main() {
  const name = new URLSearchParams(location.search).get("graph");
  const listing = await (await fetch("/api/graphs")).json();
  const select = $("graph-select");
  select.append(el("option", { value: "" }, listing.graphs.length ? "choose a graph…" : "no graphs"));
  for (const g of listing.graphs) select.append(el("option", { value: g.name }, g.name));
  select.value = name || "";
  select.addEventListener("change", () => {
    if (select.value) location.search = "?graph=" + encodeURIComponent(select.value);
  });
  bindControls();
  if (name) await loadGraph(name);
  else showList(listing);
}

function showList(listing) {
  const box = $("graph-list");
  box.hidden = false;
  box.replaceChildren(el("h2", {}, `Graphs in ${listing.directory}/`));
  if (!listing.graphs.length) {
    box.append(el("p", {}, "No graph JSON here yet: `mechscope trace \"your prompt\"` writes one to ./graphs."));
    return;
  }
  const ul = el("ul");
  for (const g of listing.graphs) {
    const li = el("li");
    const a = el("a", { href: "?graph=" + encodeURIComponent(g.name), class: "graph-link" }, g.name);
    li.append(a, el("span", { class: "hint" }, `  ${JSON.stringify(g.prompt)} · ${g.n_nodes} nodes · ` +
      `${g.n_links} edges · ${g.n_supernodes} supernodes · ${(g.bytes / 1e6).toFixed(1)} MB`));
    ul.append(li);
  }
  box.append(ul);
}

async function loadGraph(name) {
  setStatus("Loading…");
  const response = await fetch(graphUrl(name));
  if (!response.ok) {
    setStatus((await response.json()).error || `cannot load ${name}`, "error");
    return;
  }
  const graph = await response.json();
  state.name = name;
  state.graph = graph;
  for (const node of graph.nodes) {
    state.byId.set(node.node_id, node);
    state.edgesOf.set(node.node_id, []);
  }
  for (const link of graph.links) {
    state.edgesOf.get(link.source).push(link);
    if (link.target !== link.source) state.edgesOf.get(link.target).push(link);
  }
  const q = graph.qParams || {};
  state.pinned = (q.pinnedIds || []).filter((id) => state.byId.has(id));
  state.supernodes = (q.supernodes || []).map((s) => [...s]);
  const layers = graph.nodes.filter((n) => kindOf(n) === "feature" || kindOf(n) === "error").map((n) => +n.layer);
  state.nRows = (layers.length ? Math.max(...layers) : 0) + 3; // embeddings, layers, logits
  const influences = graph.nodes.filter(isPrunable).map((n) => n.influence).filter((x) => x !== null && x !== undefined);
  const slider = $("influence-slider");
  slider.max = influences.length ? Math.max(0.05, Math.ceil(Math.max(...influences) * 100) / 100) : 1;
  slider.value = slider.max;
  state.threshold = +slider.value;
  $("prompt").textContent = graph.metadata.prompt;
  $("prompt").title = graph.metadata.prompt;
  $("controls").hidden = false;
  $("download").disabled = false;
  document.title = `${graph.metadata.slug} · mechscope`;
  setStatus(`${graph.nodes.length} nodes, ${graph.links.length} edges`);
  render();
  renderSubgraph();
}

// ------------------------------------------------------------------------------------ layout
function kindOf(node) {
  return KIND[node.feature_type] || "feature";
}

function isPrunable(node) {
  const kind = kindOf(node);
  return kind === "feature" || kind === "error";
}

function rowOf(node) {
  const kind = kindOf(node);
  if (kind === "embedding") return 0;
  if (kind === "logit") return state.nRows - 1;
  return +node.layer + 1;
}

function featureOf(node) {
  const [layer, feature] = node.node_id.split("_");
  return { layer: +layer, feature: +feature };
}

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

// ------------------------------------------------------------------------------------ drawing
function render() {
  computeVisible();
  const { starts, widths, width, height } = computeLayout();
  const svg = $("graph-svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.replaceChildren();
  for (let row = 0; row < state.nRows; row++) {
    const y = yOfRow(row);
    svg.append(el("svg:line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y, y2: y, class: "row-line" }));
    const name = row === 0 ? "Emb" : row === state.nRows - 1 ? "Logit" : `L${row - 1}`;
    svg.append(el("svg:text", { x: 8, y: y + 4 }, name));
  }
  state.graph.metadata.prompt_tokens.forEach((token, pos) => {
    const x = starts[pos] + widths[pos] / 2;
    const y = yOfRow(0) + state.rowHeight / 2 + 14;
    const text = el("svg:text", { x, y, class: "axis-token", "text-anchor": "end", transform: `rotate(-35 ${x} ${y})` },
      token.replace(/\n/g, "⏎"));
    svg.append(text);
  });
  const colourOf = supernodeColours();
  for (const id of state.visible) svg.append(nodeElement(state.byId.get(id), colourOf.get(id)));
  $("node-count").textContent = `${state.visible.size} of ${state.graph.nodes.length} nodes`;
  $("influence-value").textContent = state.threshold.toFixed(2);
  const canvas = $("edge-canvas");
  const ratio = window.devicePixelRatio || 1;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  selectEdges();
  drawEdges();
}

function supernodeColours() {
  const colours = new Map();
  state.supernodes.forEach((entry, i) => {
    for (const id of entry.slice(1)) colours.set(id, SUPERNODE_COLOURS[i % SUPERNODE_COLOURS.length]);
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
  g.addEventListener("mouseenter", () => setFocus(node.node_id));
  g.addEventListener("mouseleave", () => setFocus(null));
  g.addEventListener("click", () => togglePin(node.node_id));
  return g;
}

// The edges among visible nodes, strongest first, capped at MAX_EDGES; recomputed when the visible set changes.
function selectEdges() {
  const shown = state.graph.links.filter((l) => state.visible.has(l.source) && state.visible.has(l.target));
  state.maxAbs = shown.reduce((m, l) => Math.max(m, Math.abs(l.weight)), 1e-12);
  state.shownEdges = shown.length > MAX_EDGES
    ? shown.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_EDGES) : shown;
}

function drawEdges() {
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
      ctx.strokeStyle = link.weight > 0 ? "#2563b0" : "#d4461b";
      ctx.globalAlpha = fade ? 0.06 : 0.15 + 0.75 * Math.sqrt(strength);
      ctx.lineWidth = 0.4 + 3.6 * strength;
      ctx.beginPath();
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x, b.y);
      ctx.stroke();
    }
  };
  const touching = focus ? state.edgesOf.get(focus).filter((l) => state.visible.has(l.source) && state.visible.has(l.target)) : [];
  draw(state.shownEdges, focus !== null);
  draw(touching, false);
  ctx.globalAlpha = 1;
  const neighbours = new Set(touching.flatMap((l) => [l.source, l.target]));
  for (const g of $("graph-svg").querySelectorAll(".node")) {
    const id = g.dataset.nodeId;
    g.classList.toggle("focus", id === focus);
    g.classList.toggle("pinned", state.pinned.includes(id));
    g.classList.toggle("selected", state.selected.has(id));
    g.classList.toggle("dim", focus !== null && !neighbours.has(id) && id !== focus);
  }
}

// ------------------------------------------------------------------------------------ node card
function setFocus(id) {
  state.focus = id;
  drawEdges();
  const shown = id || state.clicked;
  if (shown) showCard(shown);
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toPrecision(digits);
}

function showCard(id) {
  const node = state.byId.get(id);
  const kind = kindOf(node);
  const card = $("node-card");
  card.dataset.nodeId = id;
  const token = state.graph.metadata.prompt_tokens[node.ctx_idx];
  const title = node.clerp || (kind === "feature" ? `Feature ${featureOf(node).layer}/${featureOf(node).feature}` : id);
  const facts = el("dl", { class: "card-facts" });
  const fact = (k, v) => facts.append(el("dt", {}, k), el("dd", {}, String(v)));
  fact("node", id);
  fact("type", node.feature_type);
  if (kind === "feature") fact("feature", `${featureOf(node).layer}/${featureOf(node).feature}`);
  fact("layer", node.layer);
  fact("token", `${node.ctx_idx}: ${JSON.stringify(token)}`);
  if (kind === "feature") fact("activation", fmt(node.activation, 4));
  if (kind === "logit") fact("probability", fmt(node.token_prob, 3));
  fact("influence", fmt(node.influence));
  fact("density", node.density !== undefined ? fmt(node.density) : "–");
  const children = [el("p", { class: "card-title" }, title), facts];
  if (kind === "feature") {
    const input = el("input", { id: "label-input", type: "text", placeholder: "feature label", "aria-label": "feature label" });
    input.value = node.clerp || "";
    const button = el("button", { id: "label-save", type: "button" }, "Set label");
    button.addEventListener("click", () => setLabel(node, input.value.trim()));
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") button.click(); });
    const editor = el("div", { class: "label-editor" });
    editor.append(input, button);
    const store = el("div", { id: "card-store" }, "Loading the feature store…");
    children.push(editor, store);
    fillStoreSection(node, store);
  } else if (kind === "error") {
    children.push(el("p", { class: "hint" }, "What the transcoder at this layer and position fails to reconstruct of the MLP output."));
  }
  card.replaceChildren(...children);
}

function setLabel(node, label) {
  const { layer, feature } = featureOf(node);
  for (const other of state.graph.nodes) {
    if (kindOf(other) === "feature" && featureOf(other).layer === layer && featureOf(other).feature === feature) {
      other.clerp = label;
    }
  }
  for (const g of $("graph-svg").querySelectorAll(".node")) {
    const n = state.byId.get(g.dataset.nodeId);
    g.querySelector("title").textContent = n.clerp || n.node_id;
  }
  renderPinned();
  showCard(node.node_id);
  markDirty();
}

function cardFor(node) {
  const { layer, feature } = featureOf(node);
  const scan = state.graph.metadata.scan;
  const key = `${scan}/${layer}/${feature}`;
  if (!state.cards.has(key)) {
    state.cards.set(key, fetch(`/api/features/${layer}/${feature}?scan=${encodeURIComponent(scan)}`)
      .then(async (r) => ({ ok: r.ok, body: await r.json() })));
  }
  return state.cards.get(key);
}

async function fillStoreSection(node, box) {
  const { ok, body } = await cardFor(node);
  if ($("node-card").dataset.nodeId !== node.node_id) return; // another node took the card meanwhile
  if (!ok) {
    box.replaceChildren(el("p", { class: "card-placeholder" }, body.no_store
      ? `No feature store yet, so no examples or logits: ${body.error}.` : body.error));
    return;
  }
  const logits = el("div", { class: "logits" });
  const list = (title, items, cls) => {
    const col = el("div");
    const ol = el("ol", { class: cls });
    for (const [token, value] of items) ol.append(el("li", {}, `${JSON.stringify(token)} ${value >= 0 ? "+" : ""}${value.toFixed(3)}`));
    col.append(el("h3", {}, title), ol);
    return col;
  };
  logits.append(list("Top logits", body.top_logits, "up"), list("Bottom logits", body.bottom_logits, "down"));
  const examples = el("div", { class: "examples" });
  for (const example of body.examples) {
    const line = el("div", { class: "example" });
    example.tokens.forEach((token, i) => {
      const act = example.acts[i] || 0;
      const span = el("span", { class: "token" + (i === example.center ? " center" : ""), title: act.toFixed(3) }, token);
      const alpha = body.max_value > 0 ? Math.max(0, Math.min(1, act / body.max_value)) : 0;
      if (alpha > 0) span.style.background = `rgba(234, 88, 12, ${(0.85 * alpha).toFixed(3)})`;
      line.append(span);
    });
    examples.append(line);
  }
  const density = el("p", { class: "hint" },
    `density ${fmt(body.density)} (active on ${body.active} corpus tokens), max activation ${fmt(body.max_value)}`);
  box.replaceChildren(density, logits, el("h3", {}, "Top activating examples"), examples);
}

// ------------------------------------------------------------------------------------ subgraph
function togglePin(id) {
  state.clicked = id;
  const i = state.pinned.indexOf(id);
  if (i >= 0) {
    state.pinned.splice(i, 1);
    state.selected.delete(id);
  } else {
    state.pinned.push(id);
  }
  markDirty();
  renderSubgraph();
  drawEdges();
  showCard(id);
}

function renderSubgraph() {
  renderPinned();
  renderSupernodes();
  drawSubgraph();
  $("make-supernode").disabled = !(state.selected.size && $("supernode-label").value.trim());
}

function renderPinned() {
  const ul = $("pinned-list");
  ul.replaceChildren();
  $("pinned-count").textContent = `(${state.pinned.length} pinned)`;
  for (const id of state.pinned) {
    const node = state.byId.get(id);
    const li = el("li", { class: "pinned-item", "data-node-id": id });
    const box = el("input", { type: "checkbox", class: "select-node", "aria-label": `select ${id}` });
    box.checked = state.selected.has(id);
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(id); else state.selected.delete(id);
      renderSubgraph();
      drawEdges();
    });
    const name = el("span", { class: "name", title: id }, node.clerp || id);
    name.addEventListener("mouseenter", () => showCard(id));
    const unpin = el("button", { type: "button", title: "unpin" }, "×");
    unpin.addEventListener("click", () => togglePin(id));
    li.append(box, name, unpin);
    ul.append(li);
  }
  if (!state.pinned.length) ul.append(el("li", { class: "hint" }, "Click nodes in the graph to pin them here."));
}

function renderSupernodes() {
  const ul = $("supernode-list");
  ul.replaceChildren();
  state.supernodes.forEach(([label, ...members], i) => {
    const li = el("li", { class: "supernode-item", "data-label": label });
    const dot = el("span", { class: "swatch-dot" });
    dot.style.background = SUPERNODE_COLOURS[i % SUPERNODE_COLOURS.length];
    const name = el("span", { class: "supernode-label", title: members.join(", ") }, label);
    const count = el("span", { class: "count" }, `${members.length} nodes`);
    const remove = el("button", { type: "button", title: "remove this supernode" }, "×");
    remove.addEventListener("click", () => {
      state.supernodes.splice(i, 1);
      markDirty();
      renderSubgraph();
      render();
    });
    li.append(dot, name, count, remove);
    ul.append(li);
  });
  if (!state.supernodes.length) ul.append(el("li", { class: "hint" }, "Tick pinned nodes, name them, and group them."));
}

function makeSupernode() {
  const label = $("supernode-label").value.trim();
  const members = state.pinned.filter((id) => state.selected.has(id));
  if (!label || !members.length) return;
  const existing = state.supernodes.findIndex((s) => s[0] === label);
  if (existing >= 0) state.supernodes.splice(existing, 1); // same label: the new group replaces it
  state.supernodes.push([label, ...members]);
  state.selected.clear();
  $("supernode-label").value = "";
  markDirty();
  renderSubgraph();
  render();
}

// The subgraph: each supernode as one node, each pinned node outside supernodes as itself,
// edges summed over members (edges inside a group are left out).
function drawSubgraph() {
  const svg = $("subgraph-view");
  svg.replaceChildren();
  if (!state.graph) return;
  const groupOf = new Map();
  const groups = [];
  state.supernodes.forEach(([label, ...members], i) => {
    groups.push({ label, members, colour: SUPERNODE_COLOURS[i % SUPERNODE_COLOURS.length] });
    for (const id of members) groupOf.set(id, groups.length - 1);
  });
  for (const id of state.pinned) {
    if (!groupOf.has(id)) {
      groups.push({ label: state.byId.get(id).clerp || id, members: [id], colour: "#f2c94c" });
      groupOf.set(id, groups.length - 1);
    }
  }
  if (!groups.length) return;
  const box = svg.getBoundingClientRect();
  const width = box.width || 340;
  const height = box.height || 260;
  const nPos = state.graph.metadata.prompt_tokens.length;
  const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
  const points = groups.map((g) => {
    const nodes = g.members.map((id) => state.byId.get(id));
    return {
      x: 20 + (width - 40) * (mean(nodes.map((n) => n.ctx_idx)) + 0.5) / nPos,
      y: height - 20 - (height - 40) * mean(nodes.map(rowOf)) / Math.max(1, state.nRows - 1),
    };
  });
  const weights = new Map();
  for (const link of state.graph.links) {
    const a = groupOf.get(link.source);
    const b = groupOf.get(link.target);
    if (a === undefined || b === undefined || a === b) continue;
    const key = `${a},${b}`;
    weights.set(key, (weights.get(key) || 0) + link.weight);
  }
  const maxAbs = Math.max(1e-12, ...[...weights.values()].map(Math.abs));
  for (const [key, w] of weights) {
    const [a, b] = key.split(",").map(Number);
    svg.append(el("svg:line", {
      x1: points[a].x, y1: points[a].y, x2: points[b].x, y2: points[b].y,
      stroke: w > 0 ? "#2563b0" : "#d4461b", "stroke-width": 0.5 + 4 * Math.abs(w) / maxAbs, "stroke-opacity": 0.7,
      class: "subgraph-edge",
    }));
  }
  groups.forEach((g, i) => {
    const node = el("svg:circle", { cx: points[i].x, cy: points[i].y, r: g.members.length > 1 ? 8 : 5, fill: g.colour, stroke: "#333", class: "subgraph-node" });
    node.append(el("svg:title", {}, `${g.label} (${g.members.length} nodes)`));
    svg.append(node, el("svg:text", { x: points[i].x + 10, y: points[i].y + 3 }, g.label.slice(0, 28)));
  });
}

// ------------------------------------------------------------------------------------ save, download
function exportGraph() {
  const graph = state.graph;
  graph.qParams = { ...(graph.qParams || {}), pinnedIds: [...state.pinned], supernodes: state.supernodes.map((s) => [...s]) };
  return graph;
}

async function save() {
  setStatus("Saving…");
  const response = await fetch(graphUrl(state.name), {
    method: "PUT",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(exportGraph()),
  });
  const body = await response.json();
  if (!response.ok) {
    setStatus(`Not saved: ${body.error}`, "error");
    return;
  }
  state.dirty = false;
  $("save").disabled = true;
  setStatus(`Saved ${body.saved}`);
}

function download() {
  const blob = new Blob([JSON.stringify(exportGraph())], { type: "application/json" });
  const a = el("a", { href: URL.createObjectURL(blob), download: state.name.split("/").pop() });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function bindControls() {
  $("influence-slider").addEventListener("input", (e) => {
    state.threshold = +e.target.value;
    render();
  });
  $("show-errors").addEventListener("change", render);
  $("graph-svg").addEventListener("click", (e) => {
    if (e.target === e.currentTarget && state.clicked) { // a click on the background clears the focus
      state.clicked = null;
      drawEdges();
    }
  });
  $("supernode-label").addEventListener("input", () => {
    $("make-supernode").disabled = !(state.selected.size && $("supernode-label").value.trim());
  });
  $("supernode-label").addEventListener("keydown", (e) => { if (e.key === "Enter") makeSupernode(); });
  $("make-supernode").addEventListener("click", makeSupernode);
  $("save").addEventListener("click", save);
  $("download").addEventListener("click", download);
  window.addEventListener("beforeunload", (e) => {
    if (state.dirty) e.preventDefault();
  });
}

main().catch((e) => setStatus(`Error: ${e.message}`, "error"));

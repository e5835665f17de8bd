// mechscope graph explorer: the subgraph panel (pinned nodes, supernodes, grouped view).
// Plain JavaScript, no dependencies; every text from a graph goes through textContent.

import { $, edgeColour, el, markDirty, rowOf, state, supernodeColour } from "./common.js";
import { showCard } from "./card.js";
import { drawEdges, render } from "./graph-view.js";

// Click on a node: pin it, or unpin it (which also takes it out of its supernode: every member of a
// supernode is pinned, so the panel can always tick it).
export function togglePin(id) {
  state.clicked = id;
  const i = state.pinned.indexOf(id);
  if (i >= 0) {
    state.pinned.splice(i, 1);
    state.selected.delete(id);
    leaveSupernodes([id]);
  } else {
    state.pinned.push(id);
  }
  changed(); // redrawn: a node shown only because it was pinned goes
  showCard(id);
}

// After pins or supernodes change: unsaved, the panel and the graph (colours, visibility) redrawn.
function changed() {
  markDirty();
  renderSubgraph();
  render();
}

// Take nodes out of every supernode; groups left empty are dropped (a node is in one supernode at most).
function leaveSupernodes(ids) {
  const leaving = new Set(ids);
  state.supernodes = state.supernodes
    .map(([label, ...members]) => [label, ...members.filter((m) => !leaving.has(m))])
    .filter((entry) => entry.length > 1);
}

export function renderSubgraph() {
  renderPinned();
  renderSupernodes();
  drawSubgraph();
  updateGroupButton();
}

// "Group selected" needs ticked nodes and a label.
export function updateGroupButton() {
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
    dot.style.background = supernodeColour(i);
    const name = el("span", { class: "supernode-label", title: members.join(", ") }, label);
    const count = el("span", { class: "count" }, `${members.length} nodes`);
    const remove = el("button", { type: "button", title: "remove this supernode" }, "×");
    remove.addEventListener("click", () => {
      state.supernodes.splice(i, 1);
      changed();
    });
    li.append(dot, name, count, remove);
    ul.append(li);
  });
  if (!state.supernodes.length) ul.append(el("li", { class: "hint" }, "Tick pinned nodes, name them, and group them."));
}

export function makeSupernode() {
  const label = $("supernode-label").value.trim();
  const members = state.pinned.filter((id) => state.selected.has(id));
  if (!label || !members.length) return;
  const existing = state.supernodes.findIndex((s) => s[0] === label);
  if (existing >= 0) state.supernodes.splice(existing, 1); // same label: the new group replaces it
  leaveSupernodes(members); // members move from their old groups
  state.supernodes.push([label, ...members]);
  state.selected.clear();
  $("supernode-label").value = "";
  changed();
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
    groups.push({ label, members, colour: supernodeColour(i) });
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
  for (const [id, a] of groupOf) { // the outgoing edges of each member: work by pinned degree, not graph size
    for (const link of state.edgesOf.get(id)) {
      const b = groupOf.get(link.target);
      if (link.source !== id || b === undefined || a === b) continue;
      const key = `${a},${b}`;
      weights.set(key, (weights.get(key) || 0) + link.weight);
    }
  }
  const maxAbs = Math.max(1e-12, ...[...weights.values()].map(Math.abs));
  for (const [key, w] of weights) {
    const [a, b] = key.split(",").map(Number);
    svg.append(el("svg:line", {
      x1: points[a].x, y1: points[a].y, x2: points[b].x, y2: points[b].y,
      stroke: edgeColour(w), "stroke-width": 0.5 + 4 * Math.abs(w) / maxAbs, "stroke-opacity": 0.7,
      class: "subgraph-edge",
    }));
  }
  groups.forEach((g, i) => {
    const node = el("svg:circle", { cx: points[i].x, cy: points[i].y, r: g.members.length > 1 ? 8 : 5, fill: g.colour, stroke: "#333", class: "subgraph-node" });
    node.append(el("svg:title", {}, `${g.label} (${g.members.length} nodes)`));
    svg.append(node, el("svg:text", { x: points[i].x + 10, y: points[i].y + 3 }, g.label.slice(0, 28)));
  });
}

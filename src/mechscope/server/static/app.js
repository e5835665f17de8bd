// mechscope graph explorer: loading a graph, focus, save and download. An attribution graph
// (Neuronpedia exchange JSON) laid out by layer and token position; nothing is fetched but this
// server's own files and API.
// Plain JavaScript, no dependencies; every text from a graph goes through textContent.

import { $, el, isPrunable, kindOf, matchesQuery, replyJson, setStatus, state } from "./common.js";
import { showCard } from "./card.js";
import { drawEdges, fittingThreshold, refreshTitles, render } from "./graph-view.js";
import { makeSupernode, renderSubgraph, togglePin, updateGroupButton } from "./subgraph.js";

const OPEN_FEATURES = 60; // at most this many feature nodes when a graph opens, fewer if they would not fit the window

function graphUrl(name) {
  return "/api/graphs/" + name.split("/").map(encodeURIComponent).join("/");
}

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
    setStatus((await replyJson(response)).error, "error");
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
  const layers = graph.nodes.filter(isPrunable).map((n) => +n.layer);
  state.nRows = (layers.length ? Math.max(...layers) : 0) + 3; // embeddings, layers, logits
  const influences = graph.nodes.filter(isPrunable).map((n) => n.influence).filter((x) => x !== null && x !== undefined);
  $("side").hidden = false; // before measuring the view: the panels take part of its width
  $("controls").hidden = false;
  const slider = $("influence-slider");
  // the slider runs to 1 (every node); the graph opens at a readable threshold: the OPEN_FEATURES
  // most influential features (all of them when there are fewer), so the view fits the window
  slider.max = 1;
  state.maxInfluence = influences.length ? Math.max(...influences) : 1;
  const features = graph.nodes.filter((n) => kindOf(n) === "feature" && n.influence !== null && n.influence !== undefined)
    .map((n) => n.influence).sort((a, b) => a - b);
  const most = features.length > OPEN_FEATURES ? features[OPEN_FEATURES - 1] : 1;
  const opening = fittingThreshold(most); // and no wider than the window
  slider.value = Math.max(+slider.min, opening);
  state.threshold = Math.max(+slider.min, opening); // exactly, not snapped to the slider's steps
  const meta = graph.metadata;
  $("prompt").textContent = meta.prompt;
  $("prompt").title = `${meta.prompt}\nmodel ${meta.model_id || "?"}, transcoders ${meta.scan}` +
    (meta.pruning_settings ? `, pruned at node ${meta.pruning_settings.node_threshold} / edge ${meta.pruning_settings.edge_threshold}` : "");
  $("controls").hidden = false;
  $("download").disabled = false;
  document.title = `${meta.slug} · mechscope`;
  setStatus(`${graph.nodes.length} nodes, ${graph.links.length} edges`);
  render();
  renderSubgraph();
  $("graph-view").scrollLeft = 0; // the prompt's first tokens in view; the logits' column fits at the opening threshold
}

// Move the card and the highlighted edges to a node without pinning it (search, edge lists).
function selectNode(id) {
  state.clicked = id;
  drawEdges();
  showCard(id);
}

function setFocus(id) {
  state.focus = id;
  drawEdges();
  const shown = id || state.clicked;
  if (shown) showCard(shown);
}

function exportGraph() {
  const graph = state.graph;
  graph.qParams = { ...(graph.qParams || {}), pinnedIds: [...state.pinned], supernodes: state.supernodes.map((s) => [...s]) };
  return graph;
}

async function save() {
  setStatus("Saving…");
  const sent = state.edits;
  const response = await fetch(graphUrl(state.name), {
    method: "PUT",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(exportGraph()),
  });
  const body = await replyJson(response);
  if (!response.ok) {
    setStatus(`Not saved: ${body.error}`, "error");
    return;
  }
  if (state.edits !== sent) { // changed while the save was under way: those changes are not saved yet
    setStatus(`Saved ${body.saved}; newer changes unsaved`, "dirty");
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

// The search box marks matching nodes; Enter moves the card and the highlighted edges to the first
// visible one. Escape clears the search and the focus.
function search(query, go) {
  query = query.trim().toLowerCase();
  state.matches = new Set(query ? state.graph.nodes.filter((n) => matchesQuery(n, query)).map((n) => n.node_id) : []);
  const shown = [...state.matches].filter((id) => state.visible.has(id));
  const hidden = state.matches.size - shown.length;
  $("search-count").textContent = query ? `${shown.length} found${hidden ? `, ${hidden} hidden by the slider` : ""}` : "";
  if (go && shown.length) {
    selectNode(shown[0]);
    document.querySelector(`#graph-svg .node[data-node-id="${CSS.escape(shown[0])}"]`).scrollIntoView({ block: "center", inline: "center" });
  }
  drawEdges();
}

function bindControls() {
  $("node-search").addEventListener("input", (e) => search(e.target.value, false));
  $("node-search").addEventListener("keydown", (e) => { if (e.key === "Enter") search(e.target.value, true); });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || !state.graph) return;
    $("node-search").value = "";
    state.clicked = null;
    search("", false);
  });
  state.on.focus = setFocus;
  state.on.pin = togglePin;
  state.on.select = selectNode;
  state.on.labelled = () => {
    refreshTitles();
    renderSubgraph();
  };
  $("influence-slider").addEventListener("input", (e) => {
    state.threshold = +e.target.value;
    render();
    search($("node-search").value, false);
  });
  $("show-errors").addEventListener("change", render);
  $("graph-svg").addEventListener("click", (e) => {
    if (e.target === e.currentTarget && state.clicked) { // a click on the background clears the focus
      state.clicked = null;
      drawEdges();
    }
  });
  $("supernode-label").addEventListener("input", updateGroupButton);
  $("supernode-label").addEventListener("keydown", (e) => { if (e.key === "Enter") makeSupernode(); });
  $("make-supernode").addEventListener("click", makeSupernode);
  $("save").addEventListener("click", save);
  $("download").addEventListener("click", download);
  window.addEventListener("beforeunload", (e) => {
    if (state.dirty) e.preventDefault();
  });
}

main().catch((e) => setStatus(`Error: ${e.message}`, "error"));

// mechscope graph explorer: shared state and helpers.
// Plain JavaScript, no dependencies; every text from a graph goes through textContent.

const SVG = "http://www.w3.org/2000/svg";

const SUPERNODE_COLOURS = ["#e11d48", "#7c3aed", "#0891b2", "#65a30d", "#c2410c", "#db2777", "#4f46e5", "#0d9488"];

// The colour of the i-th supernode, and of an edge by its sign (as --positive / --negative in style.css).
export const supernodeColour = (i) => SUPERNODE_COLOURS[i % SUPERNODE_COLOURS.length];
export const edgeColour = (weight) => (weight > 0 ? "#2563b0" : "#d4461b");

export const KIND = {
  "cross layer transcoder": "feature",
  "mlp reconstruction error": "error",
  "embedding": "embedding",
  "logit": "logit",
};

export const state = {
  name: null, // graph name (path inside the served directory)
  graph: null,
  byId: new Map(), // node_id -> node
  edgesOf: new Map(), // node_id -> links touching it
  pos: new Map(), // node_id -> {x, y} of the current layout
  visible: new Set(),
  nRows: 0,
  rowHeight: 0, // px, set by the layout to fill the view
  threshold: 1,
  pinned: [],
  selected: new Set(),
  supernodes: [], // [label, ...node_ids]
  focus: null, // hovered node id
  clicked: null, // last clicked node id
  matches: new Set(), // node ids found by the search box
  shownEdges: [], // edges drawn, strongest first
  maxAbs: 1, // largest |weight| among the visible edges
  dirty: false,
  edits: 0, // count of changes, so a save only clears "dirty" for the changes it sent
  cards: new Map(), // "scan/layer/feature" -> Promise of card JSON
  on: {}, // what the page does when a node is hovered (focus), clicked (pin), chosen in a card (select) or relabelled: set by app.js
};

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, text = null) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
}

export function setStatus(text, kind = "") {
  const s = $("status");
  s.textContent = text;
  s.className = kind;
}

export function markDirty() {
  state.dirty = true;
  state.edits += 1;
  $("save").disabled = false;
  setStatus("Unsaved changes", "dirty");
}

// Whether both ends of a link are drawn.
export function isShown(link) {
  return state.visible.has(link.source) && state.visible.has(link.target);
}

export function kindOf(node) {
  return KIND[node.feature_type] || "feature";
}

export function isPrunable(node) {
  const kind = kindOf(node);
  return kind === "feature" || kind === "error";
}

export function rowOf(node) {
  const kind = kindOf(node);
  if (kind === "embedding") return 0;
  if (kind === "logit") return state.nRows - 1;
  return +node.layer + 1;
}

export function featureOf(node) {
  const [layer, feature] = node.node_id.split("_");
  return { layer: +layer, feature: +feature };
}

// The JSON body of a reply, or {error} with the status when the server sent something else.
export async function replyJson(response) {
  try {
    return await response.json();
  } catch {
    return { error: `the server answered ${response.status} ${response.statusText} without JSON` };
  }
}

// Whether a node answers a search: its label contains the text, or its id or "layer/feature" starts with it.
export function matchesQuery(node, query) {
  if ((node.clerp || "").toLowerCase().includes(query) || node.node_id.toLowerCase().startsWith(query)) return true;
  if (kindOf(node) !== "feature") return false;
  const { layer, feature } = featureOf(node);
  return `${layer}/${feature}` === query;
}

export function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toPrecision(digits);
}

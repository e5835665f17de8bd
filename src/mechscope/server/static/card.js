// mechscope graph explorer: the node card (graph fields, label editor, feature store section).
// Plain JavaScript, no dependencies; every text from a graph goes through textContent.

import { $, el, featureOf, fmt, kindOf, markDirty, replyJson, state } from "./common.js";

const N_EDGES_LISTED = 6;

// Neuronpedia's feature_type says "cross layer transcoder" for every transcoder feature; name what it is
function typeName(node) {
  if (node.feature_type !== "cross layer transcoder") return node.feature_type;
  const kind = state.graph.metadata.transcoder_kind;
  return kind === "cross-layer" ? "cross-layer transcoder feature" : kind === "per-layer"
    ? "per-layer transcoder feature" : "transcoder feature";
}

export function showCard(id) {
  const node = state.byId.get(id);
  const kind = kindOf(node);
  const card = $("node-card");
  card.dataset.nodeId = id;
  const token = state.graph.metadata.prompt_tokens[node.ctx_idx];
  const title = node.clerp || (kind === "feature" ? `Feature ${featureOf(node).layer}/${featureOf(node).feature}` : id);
  const facts = el("dl", { class: "card-facts" });
  const fact = (k, v) => facts.append(el("dt", {}, k), el("dd", {}, String(v)));
  fact("node", id);
  fact("type", typeName(node));
  if (kind === "feature") fact("feature", `${featureOf(node).layer}/${featureOf(node).feature}`);
  fact("layer", node.layer);
  fact("token", `${node.ctx_idx}: ${JSON.stringify(token)}`);
  if (kind === "feature") fact("activation", fmt(node.activation, 4));
  if (kind === "logit") fact("probability", fmt(node.token_prob, 3));
  if (node.diff_side !== undefined) { // a node of a `mechscope diff` graph: both graphs' values
    const side = { both: "A and B", a: "A only", b: "B only" }[node.diff_side] || node.diff_side;
    const pair = (a, b) => `${a === undefined || a === null ? "–" : fmt(a, 3)} / ${b === undefined || b === null ? "–" : fmt(b, 3)}`;
    fact("in graph", side);
    fact("activation A / B", pair(node.activation_a, node.activation_b));
    fact("total effect A / B", pair(node.total_effect_a, node.total_effect_b));
  }
  fact("influence (unsigned)", fmt(node.influence));
  if (node.total_effect !== undefined) {
    const target = state.graph.metadata.effects_target;
    const on = target !== undefined && target !== null ? ` on ${JSON.stringify(target)}` : "";
    const signed = (v) => (v > 0 ? "+" : "") + fmt(v, 3);
    fact(`direct effect${on}`, signed(node.direct_effect));
    fact(`total effect${on}`, signed(node.total_effect));
  }
  if (node.density !== undefined) {
    fact("density", fmt(node.density));
    facts.lastChild.classList.add("fact-density");
    facts.lastChild.previousSibling.classList.add("fact-density");
  }
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
    children.push(editor, edgeLists(id), store);
    fillStoreSection(node, store);
  } else {
    if (kind === "error") {
      children.push(el("p", { class: "hint" }, "What the transcoder at this layer and position fails to reconstruct of the MLP output."));
    }
    children.push(edgeLists(id));
  }
  card.replaceChildren(...children);
}

// The node's strongest incoming and outgoing edges in the graph (direct effects, by |weight|);
// clicking one moves the card and the highlighted edges to that node.
function edgeLists(id) {
  const box = el("div", { class: "edge-lists" });
  const column = (title, cls, links, other) => {
    const col = el("div");
    const ol = el("ol", { class: cls });
    const strongest = [...links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, N_EDGES_LISTED);
    for (const link of strongest) {
      const peer = state.byId.get(link[other]);
      const li = el("li", { "data-node-id": peer.node_id, title: `${peer.clerp || peer.node_id} (${peer.node_id}, weight ${link.weight})` });
      const weight = el("span", { class: link.weight > 0 ? "up" : "down" }, `${link.weight > 0 ? "+" : ""}${fmt(link.weight)}`);
      li.append(weight, ` ${peer.clerp || peer.node_id}`);
      li.addEventListener("click", () => state.on.select(peer.node_id));
      ol.append(li);
    }
    if (!strongest.length) ol.append(el("li", { class: "hint" }, "none"));
    col.append(el("h3", {}, `${title} (${links.length})`), ol);
    return col;
  };
  const links = state.edgesOf.get(id);
  box.append(column("Inputs", "inputs", links.filter((l) => l.target === id), "source"),
    column("Outputs", "outputs", links.filter((l) => l.source === id), "target"));
  return box;
}

function setLabel(node, label) {
  const { layer, feature } = featureOf(node);
  for (const other of state.graph.nodes) {
    if (kindOf(other) === "feature" && featureOf(other).layer === layer && featureOf(other).feature === feature) {
      other.clerp = label;
    }
  }
  state.on.labelled();
  showCard(node.node_id);
  markDirty();
}

function cardFor(node) {
  const { layer, feature } = featureOf(node);
  const scan = state.graph.metadata.scan;
  const key = `${scan}/${layer}/${feature}`;
  if (!state.cards.has(key)) {
    const request = fetch(`/api/features/${layer}/${feature}?scan=${encodeURIComponent(scan)}`)
      .then(async (r) => ({ ok: r.ok, status: r.status, body: await replyJson(r) }))
      .catch((e) => ({ ok: false, status: 0, body: { error: `no answer from the server: ${e.message}` } }));
    state.cards.set(key, request);
    request.then((reply) => { // keep cards and "no store" answers; ask again after a failure
      if (!reply.ok && !reply.body.no_store && reply.status !== 404) state.cards.delete(key);
    });
  }
  return state.cards.get(key);
}

async function fillStoreSection(node, box) {
  const { ok, body } = await cardFor(node);
  if ($("node-card").dataset.nodeId !== node.node_id) return; // another node took the card meanwhile
  if (!ok || body.no_store) {
    box.replaceChildren(el("p", { class: "card-placeholder" }, body.no_store
      ? `No feature store yet, so no examples or logits: ${body.error}.` : body.error));
    return;
  }
  // the store's density replaces the graph's: one density on the card
  $("node-card").querySelectorAll(".fact-density").forEach((e) => e.remove());
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

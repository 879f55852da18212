// The promptcache dashboard: polls /v1/cache/dashboard with the key and draws everything itself
// (plain DOM and SVG, no libraries), so it works offline and needs no build step.
"use strict";

const KEY_ITEM = "promptcache-key";
let timer = null;

function keyFromPage() {
  const match = /(?:^|[#&])key=([^&]*)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(KEY_ITEM, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname);  // keep the key out of the address bar
  }
  return sessionStorage.getItem(KEY_ITEM) || "";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

const fmt = (n) => Number(n).toLocaleString("en-US");
const bytes = (n) => n >= 1 << 30 ? (n / (1 << 30)).toFixed(2) + " GiB"
  : n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + " MiB" : (n / 1024).toFixed(1) + " KiB";
const money = (n) => "$" + Number(n).toFixed(4);
const clock = (s) => { s = Math.max(0, Math.round(s)); return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0"); };

function rows(table, data) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren(...data.map((cells) => el("tr", {}, ...cells.map((c) =>
    c instanceof Node ? el("td", {}, c) : el("td", {}, String(c))))));
}

function totals(data) {
  const t = data.total;
  const cards = [
    ["requests", fmt(t.requests)], ["hit rate", (100 * t.hit_rate).toFixed(1) + "%"],
    ["tokens read", fmt(t.read_tokens)], ["tokens written", fmt(t.written_tokens)],
    ["prefill saved", t.prefill_seconds_saved.toFixed(2) + " s"], ["money saved", money(t.money_saved)],
    ["entries", fmt(data.entries.length)],
  ];
  document.getElementById("totals").replaceChildren(...cards.map(([k, v]) =>
    el("div", { class: "card", "data-total": k }, el("div", { class: "v" }, v), el("div", { class: "k" }, k))));
}

function chart(series) {
  const root = document.getElementById("chart");
  const W = 600, H = 200, P = 6;
  const nodes = [svg("line", { x1: 0, y1: H - P, x2: W, y2: H - P, stroke: "#ccd" })];
  if (series.length) {
    const t0 = series[0].time, t1 = Math.max(series[series.length - 1].time, t0 + 1);
    const x = (t) => P + (W - 2 * P) * (t - t0) / (t1 - t0);
    const maxSaved = Math.max(1, ...series.map((b) => b.tokens_saved));
    const line = (key, scale, color, cls) => {
      const points = series.map((b) => x(b.time).toFixed(1) + "," + (H - P - (H - 2 * P) * b[key] / scale).toFixed(1));
      if (points.length === 1) points.push((W - P) + "," + points[0].split(",")[1]);
      nodes.push(svg("polyline", { points: points.join(" "), fill: "none", stroke: color, "stroke-width": 2, class: cls }));
    };
    line("hit_rate", 1, "#2a7ae2", "hit-rate");
    line("tokens_saved", maxSaved, "#1a9c5b", "tokens-saved");
    const label = svg("text", { x: W - P, y: 14, "text-anchor": "end", "font-size": 12, fill: "#1a9c5b" });
    label.textContent = fmt(maxSaved) + " tokens";
    nodes.push(label);
  }
  root.replaceChildren(...nodes);
}

function tiers(list) {
  document.getElementById("tiers").replaceChildren(...list.map((t) => {
    const share = t.capacity_bytes ? Math.min(100, 100 * t.used_bytes / t.capacity_bytes) : 0;
    const fits = t.capacity_tokens ? ` (~${fmt(t.capacity_tokens)} tokens)` : "";
    return el("div", { "data-tier": t.name },
      el("div", {}, `${t.name}: ${bytes(t.used_bytes)} of ${bytes(t.capacity_bytes)}${fits}`),
      el("div", { class: "bar" }, el("div", { style: `width:${share.toFixed(1)}%` })));
  }));
}

function render(data) {
  document.getElementById("model").textContent = data.model;
  document.getElementById("scope").textContent = data.scope === "all" ? "all tenants" : "tenant " + data.tenant;
  totals(data);
  chart(data.series);
  rows("#misses", Object.entries(data.total.misses_by_reason).map(([r, n]) => [r, fmt(n)]));
  tiers(data.tiers);
  // A tier with a copy below it (written behind to disk) reads "host + disk".
  rows("#entries", data.entries.map((e) => [e.tenant, fmt(e.tokens), [e.tier, ...(e.copies || [])].join(" + "), e.ttl, clock(e.ttl_left_s), e.hits]));
  rows("#recent", data.recent.map((r) => [
    new Date(r.time * 1000).toLocaleTimeString(), r.tenant, fmt(r.prompt_tokens), fmt(r.read_tokens),
    fmt(r.written_tokens), el("span", { class: r.outcome }, r.outcome),
    r.misses.map((m) => `${m.reason} @${m.block}`).join(", "), r.ttft_ms + " ms"]));
}

async function poll() {
  const key = sessionStorage.getItem(KEY_ITEM) || "";
  const status = document.getElementById("status");
  try {
    const reply = await fetch("/v1/cache/dashboard", { headers: key ? { authorization: "Bearer " + key } : {} });
    if (reply.status === 401 || reply.status === 403) {
      sessionStorage.removeItem(KEY_ITEM);
      showLogin("that key is not accepted");
      return;
    }
    const data = await reply.json();
    document.getElementById("main").hidden = false;
    document.getElementById("login").hidden = true;
    render(data);
    status.textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "1";
    timer = setTimeout(poll, 1000 * (data.poll_s || 2));
  } catch (err) {
    status.textContent = "offline: " + err;
    timer = setTimeout(poll, 5000);
  }
}

function showLogin(message) {
  clearTimeout(timer);
  document.getElementById("status").textContent = message || "";
  document.getElementById("login").hidden = false;
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, document.getElementById("key").value);
  poll();
});

keyFromPage();
poll();

// Tributary dashboard: a little vanilla JavaScript over the hub's documented /api endpoints.
// Forms and buttons call the REST API (the session cookie authorises them); live pages follow
// the server-sent event streams under /api/experiments/.../events.
"use strict";

const FIELD_LABELS = {
  spoke_ids: "Target spokes", name: "Name", algorithm_id: "Algorithm version",
  arguments: "Arguments", expires_in_days: "Expiry", max_cases: "At most this many cases",
  timeout_seconds: "Time per case", memory_mb: "Memory per case", cpus: "CPUs per case",
  reason: "Reason", comment: "Comment", aggregator_parameters: "Aggregator parameters",
};
const STATE_CLASS = {
  succeeded: "ok", completed: "ok", failed: "fail", refused: "fail", cancelled: "fail",
  running: "run", accepted: "run", launched: "run", cancelling: "run", held: "wait",
};

/** A readable message from an API error body (FastAPI's detail string or list). */
function errorMessage(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  // A launch refused before anything was sent: each target spoke's reason on its own line.
  if (detail && Array.isArray(detail.refusals)) {
    return [detail.message, ...detail.refusals.map((r) => `${r.spoke_id}: ${r.reason}`)].join("\n");
  }
  if (Array.isArray(detail)) {
    return detail.map((e) => {
      const field = (e.loc || []).filter((p) => p !== "body").pop();
      const label = FIELD_LABELS[field] || field || "request";
      if (field === "spoke_ids" && e.type === "too_short") return "Choose at least one target spoke.";
      return `${label}: ${e.msg}`;
    }).join(" ");
  }
  return `The hub refused the request (HTTP ${status}).`;
}

/** Call the API; resolves to the JSON body, or rejects with a readable Error. */
async function api(method, url, body) {
  const options = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  // The session cookie alone is not enough for a change: the page's CSRF token goes along.
  const csrf = document.querySelector('meta[name="csrf-token"]');
  if (csrf) options.headers["X-CSRF-Token"] = csrf.content;
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`The hub cannot be reached: ${err.message}`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error(errorMessage(response.status, data));
  return data;
}

function showError(scope, message) {
  const box = scope.querySelector("[data-error]") || document.querySelector("[data-error]");
  if (box) {
    box.textContent = message;
    if (message) box.scrollIntoView({ block: "nearest" });
  }
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => {
    if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  });
  children.flat().forEach((c) => node.append(c instanceof Node ? c : document.createTextNode(c ?? "")));
  return node;
}

function badge(state) {
  return el("span", { class: `badge ${STATE_CLASS[state] || "wait"}` }, state);
}

// --- Buttons and small forms that call one endpoint (launch, review, revoke…) ------------
function wireApiActions() {
  document.querySelectorAll("button[data-api]").forEach((button) => {
    button.addEventListener("click", async () => {
      const scope = button.closest("section, .panel, main") || document;
      if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
      button.disabled = true;
      showError(scope, "");
      try {
        await api("POST", button.dataset.api);
        window.location.reload();
      } catch (err) {
        showError(scope, err.message);
        button.disabled = false;
      }
    });
  });
  document.querySelectorAll("form[data-api]").forEach((form) => {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const scope = form.closest("section, .panel, main") || document;
      if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
      const body = Object.fromEntries(new FormData(form).entries());
      if (event.submitter && event.submitter.name) body[event.submitter.name] = event.submitter.value;
      showError(scope, "");
      try {
        await api("POST", form.dataset.api, body);
        window.location.reload();
      } catch (err) {
        showError(scope, err.message);
      }
    });
  });
}

// --- New experiment form ----------------------------------------------------------------
function wireNewExperiment() {
  const form = document.getElementById("new-experiment");
  if (!form) return;
  const algorithms = JSON.parse(document.getElementById("algorithms-data").textContent);
  const select = form.elements.algorithm_id;
  const args = form.elements.arguments;
  const launch = form.elements.launch;
  const submit = document.getElementById("submit");
  const aggregators = JSON.parse(document.getElementById("aggregators-data").textContent);
  const aggregator = form.elements.aggregator;
  const showAggregator = () => {
    const chosen = aggregators.find((a) => a.name === aggregator.value);
    document.getElementById("aggregator-schema").textContent = chosen ? JSON.stringify(chosen.schema, null, 2) : "";
  };
  const showAlgorithm = () => {
    const chosen = algorithms.find((a) => String(a.id) === select.value);
    if (!chosen) return;
    args.value = JSON.stringify(chosen.defaults, null, 2);
    document.getElementById("schema").textContent = JSON.stringify(chosen.schema, null, 2);
    if (aggregators.some((a) => a.name === chosen.aggregator)) aggregator.value = chosen.aggregator;
    showAggregator();
  };
  select.addEventListener("change", showAlgorithm);
  aggregator.addEventListener("change", showAggregator);
  launch.addEventListener("change", () => {
    submit.textContent = launch.checked ? "Create and launch" : "Save as draft";
  });
  showAlgorithm();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(form, "");
    let argumentsValue;
    try {
      argumentsValue = JSON.parse(args.value || "{}");
    } catch (err) {
      showError(form, `Arguments: not valid JSON (${err.message}).`);
      return;
    }
    if (argumentsValue === null || typeof argumentsValue !== "object" || Array.isArray(argumentsValue)) {
      showError(form, "Arguments: must be a JSON object, e.g. {\"threshold\": 0.5}.");
      return;
    }
    let parameters;
    try {
      parameters = JSON.parse(form.elements.aggregator_parameters.value || "{}");
    } catch (err) {
      showError(form, `Aggregator parameters: not valid JSON (${err.message}).`);
      return;
    }
    const number = (name) => (form.elements[name].value === "" ? null : Number(form.elements[name].value));
    const cohort = { modality: form.elements.modality.value.trim() || null };
    if (number("max_cases") !== null) cohort.max_cases = number("max_cases");
    const body = {
      name: form.elements.name.value.trim(),
      algorithm_id: Number(select.value),
      arguments: argumentsValue,
      spoke_ids: [...form.querySelectorAll("input[name=spoke_ids]:checked")].map((c) => c.value),
      cohort,
      release: form.elements.release.value.split(",").map((s) => s.trim()).filter(Boolean),
      limits: { timeout_seconds: number("timeout_seconds"), memory_mb: number("memory_mb"), cpus: number("cpus") },
      expires_in_days: number("expires_in_days"),
      aggregator: aggregator.value,
      aggregator_parameters: parameters,
    };
    submit.disabled = true;
    let created;
    try {
      created = await api("POST", "/api/experiments", body);
    } catch (err) {
      showError(form, `Not created: ${err.message}`);
      submit.disabled = false;
      return;
    }
    if (launch.checked) {
      try {
        await api("POST", `/api/experiments/${created.id}/launch`);
      } catch (err) {
        showError(form, `Saved as draft ${created.id} but not launched: ${err.message}`);
        submit.disabled = false;
        return;
      }
    }
    window.location.assign(`/experiments/${created.id}`);
  });
}

// --- Live experiment page -----------------------------------------------------------------
function progressCells(t) {
  const total = t.case_count || 0;
  const pct = (n) => (total ? `width:${(100 * n) / total}%` : "width:0");
  const known = t.case_count === null ? "unknown" : t.case_count;
  return [
    el("td", {}, `${t.spoke_id} `, el("span", { class: `badge ${t.spoke_online ? "ok" : "fail"}` },
      t.spoke_online ? "online" : "offline")),
    el("td", {}, badge(t.state), ...(t.reason ? [el("br"), el("small", {}, t.reason)] : []),
      ...(t.waiting_for ? [el("br"), el("small", {}, t.waiting_for)] : [])),
    el("td", {}, el("div", { class: "bar", role: "img",
      "aria-label": `${t.succeeded} done, ${t.failed} failed, ${t.running} running of ${known}` },
    el("span", { class: "ok", style: pct(t.succeeded) }), el("span", { class: "fail", style: pct(t.failed) }),
    el("span", { class: "run", style: pct(t.running) }))),
    ...[t.queued, t.running, t.succeeded, t.failed, t.cancelled || 0].map((n) => el("td", { class: "num" }, String(n))),
    el("td", { class: "num" }, t.case_count === null ? "–" : String(t.case_count)),
  ];
}

function caseCells(c) {
  let detail = [];
  if (c.failure) detail = [el("b", {}, c.failure.reason || "failed"), `: ${c.failure.detail || ""}`];
  else if (c.output) detail = [el("code", {}, JSON.stringify(c.output).slice(0, 140))];
  else if (c.state === "running" && c.progress_fraction !== null && c.progress_fraction !== undefined) {
    detail = [el("progress", { max: "1", value: String(c.progress_fraction) },
      `${Math.round(100 * c.progress_fraction)}%`), ` ${c.progress_message || ""}`];
  }
  if (c.note) detail.push(el("br"), el("small", {}, c.note));
  const attempts = (c.attempts || []).length;
  return [el("td", {}, c.spoke_id), el("td", {}, el("code", {}, c.case_id)), el("td", {}, badge(c.state)),
    el("td", { class: "num" }, String(c.attempt), ...(attempts > 1 ? [el("br"), el("small", {}, `${attempts} attempts`)] : [])),
    el("td", {}, detail)];
}

let resultsRequest = 0;
async function refreshResults(root) {
  const mine = ++resultsRequest; // an older, slower answer must not overwrite a newer one
  // The same choices as the page: output, figure, and the spoke table's sort and page.
  const page = new URLSearchParams(window.location.search);
  const query = new URLSearchParams();
  ["quantity", "metric", "sort", "desc", "page"].forEach((k) => { if (page.get(k)) query.set(k, page.get(k)); });
  const url = `/experiments/${root.dataset.experiment}/results${query.toString() ? `?${query}` : ""}`;
  const response = await fetch(url, { credentials: "same-origin" });
  const html = response.ok ? await response.text() : null;
  if (html !== null && mine === resultsRequest) document.getElementById("results").innerHTML = html;
}

/** The experiments list is re-read at most this often (ms) while studies run. */
const LIST_SPACING = 15000;
/** Above this many cases, viewers re-read the case table on demand only. */
const LARGE_STUDY = 1000;

let casesRequest = 0;
/** Re-read the page of cases the table shows (same cursor and filters) from the API. */
async function refreshCases(root) {
  const table = document.getElementById("cases");
  if (!table) return; // users who may not see per-case data have no case table
  const mine = ++casesRequest;
  const page = new URLSearchParams(window.location.search);
  const query = new URLSearchParams();
  ["cursor", "spoke", "state"].forEach((k) => { if (page.get(k)) query.set(k, page.get(k)); });
  const response = await fetch(`/api/experiments/${root.dataset.experiment}/cases?${query}`,
    { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (!response.ok || mine !== casesRequest) return;
  const cases = await response.json();
  const rows = cases.map((c) => el("tr", {}, caseCells(c)));
  table.replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "5" }, "No case has started yet."))]));
}

function wireLiveExperiment() {
  const root = document.getElementById("experiment");
  if (!root || !root.dataset.live || !window.EventSource) return;
  const live = document.getElementById("live");
  const source = new EventSource(root.dataset.live);
  let timer = null;
  let last = 0;
  // Plots are drawn on the hub: redraw at most every few seconds however fast cases finish
  // (every ten for a large study, whose every viewer re-reads the same summary).
  const scheduleResults = () => {
    if (timer) return;
    // A large study's viewers all hear of a snapshot at once: spread their reads over 2 s.
    const spread = large() ? Math.random() * 2000 : 0;
    const wait = Math.max(spread, last + (large() ? 10000 : 4000) - Date.now());
    timer = setTimeout(() => { timer = null; last = Date.now(); refreshResults(root); }, wait);
  };
  source.addEventListener("open", () => { live.textContent = "live"; live.classList.add("on"); });
  source.addEventListener("error", () => { live.textContent = "reconnecting…"; live.classList.remove("on"); });
  // The first event carries every target; later ones ("delta") only the targets that
  // changed and the aggregate snapshot's version: rows are patched in place, and the
  // results section is re-read only when the snapshot (or the experiment's state) changes.
  const targets = new Map();
  let snapshot = null;
  let casesTimer = null;
  let casesLast = 0;
  // A study of more than LARGE_STUDY cases: its page of cases is re-read when asked (a
  // button), not by every viewer every two seconds while results stream in.
  const large = () => [...targets.values()].reduce((n, t) => n + (t.case_count || 0), 0) > LARGE_STUDY;
  const staleCases = document.getElementById("cases-stale");
  if (staleCases) {
    staleCases.addEventListener("click", () => { staleCases.hidden = true; refreshCases(root); });
  }
  const scheduleCases = () => { // one page of at most 100 cases, at most every 2 seconds
    if (large()) {
      if (staleCases) staleCases.hidden = false;
      return;
    }
    if (casesTimer) return;
    const wait = Math.max(0, casesLast + 2000 - Date.now());
    casesTimer = setTimeout(() => { casesTimer = null; casesLast = Date.now(); refreshCases(root); }, wait);
  };
  source.addEventListener("progress", (event) => {
    const { experiment, snapshot: version, delta } = JSON.parse(event.data);
    const state = document.getElementById("experiment-state");
    state.replaceWith(Object.assign(badge(experiment.state), { id: "experiment-state" }));
    const moved = root.dataset.state !== experiment.state;
    root.dataset.state = experiment.state;
    const body = document.getElementById("progress");
    experiment.targets.forEach((t) => {
      targets.set(t.spoke_id, t);
      const row = el("tr", { "data-spoke": t.spoke_id }, progressCells(t));
      const old = [...body.children].find((r) => r.dataset.spoke === t.spoke_id);
      if (old) old.replaceWith(row); else body.append(row);
    });
    const totals = document.getElementById("progress-totals");
    if (totals) { // many spokes: the sums over every spoke, above the long table
      const all = [...targets.values()];
      const sum = (k) => all.reduce((n, t) => n + (t[k] || 0), 0);
      totals.textContent = `${all.length} spokes: ${sum("succeeded")} done, ${sum("failed")} failed, `
        + `${sum("running")} running, ${sum("queued")} queued; ${all.filter((t) => !t.spoke_online).length} spokes offline.`;
    }
    // Buttons that only make sense in some states (launch, cancel) go when it moves on.
    const anyFailed = [...targets.values()].some((t) => t.failed > 0);
    root.querySelectorAll("[data-while]").forEach((button) => {
      button.hidden = !button.dataset.while.split(" ").includes(experiment.state)
        || (button.hasAttribute("data-when-failed") && !anyFailed);
    });
    const changed = snapshot !== null && version !== snapshot;
    snapshot = version;
    if (changed || moved) scheduleResults();
    if (delta && experiment.targets.length) scheduleCases();
  });
  source.addEventListener("end", () => {
    source.close();
    live.textContent = "finished";
    live.classList.remove("on");
    clearTimeout(timer);
    timer = "done"; // no more scheduled redraws: this one is final
    refreshResults(root);
    clearTimeout(casesTimer);
    refreshCases(root);
  });
}

// --- Live experiment list: re-read the server-rendered list when anything changes ---------
function wireLiveList() {
  const list = document.getElementById("experiment-list");
  if (!list || !list.dataset.liveList || !window.EventSource) return;
  const source = new EventSource(list.dataset.liveList);
  let first = true;
  let timer = null;
  let last = 0;
  const reread = async () => {
    timer = null;
    last = Date.now();
    const response = await fetch(window.location.pathname, { credentials: "same-origin" });
    if (!response.ok) return;
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.getElementById("experiment-list");
    if (fresh) list.innerHTML = fresh.innerHTML;
  };
  // The stream says something changed (every second while a study runs): re-read the
  // page at most every LIST_SPACING, spread over two seconds, so that a hundred open
  // lists do not each re-read it every second.
  // Small studies and a study changing state (launched, completed...) are shown within
  // two seconds.
  let states = "";
  source.addEventListener("progress", (event) => {
    const { experiments } = JSON.parse(event.data);
    const now = experiments.map((e) => `${e.id}:${e.state}`).join(" ");
    const moved = now !== states;
    states = now;
    if (first) { first = false; return; } // the page already shows this snapshot
    const running = experiments.filter((e) => e.state === "launched")
      .reduce((n, e) => n + e.targets.reduce((m, t) => m + (t.case_count || 0), 0), 0);
    const spacing = moved || running <= LARGE_STUDY ? 2000 : LIST_SPACING;
    const wait = Math.max(Math.random() * 2000, last + spacing - Date.now());
    if (timer && !moved) return;
    clearTimeout(timer);
    timer = setTimeout(reread, wait);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  wireApiActions();
  wireNewExperiment();
  wireLiveExperiment();
  wireLiveList();
});

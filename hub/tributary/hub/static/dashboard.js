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
  aggregated: "ok", finished: "ok", retried: "wait", stopped_budget: "wait",
  keys: "run", shares: "run", masked: "run", consistency: "run", unmask: "run",
};

/** A readable message from an API error body (FastAPI's detail string or list). */
function errorMessage(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  // A launch refused before anything was sent: each target spoke's reason on its own line.
  if (detail && Array.isArray(detail.refusals)) {
    return [detail.message, ...detail.refusals.map((r) => `${r.spoke_id}: ${r.reason}`)].join("\n");
  }
  // A launch outside its data access request: the hub's sentence names the condition.
  if (detail && typeof detail.message === "string") return detail.message;
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
  if (!response.ok) {
    const error = new Error(errorMessage(response.status, data));
    error.body = data;  // for forms that show each validation error beside its field
    throw error;
  }
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
/** The field error box for ``name`` (created after its input when the page has none). */
function fieldErrorBox(form, name) {
  let box = form.querySelector(`[data-field-error="${name}"]`);
  if (!box) {
    const input = form.elements[name];
    if (!input || !input.insertAdjacentElement) return null;
    box = el("p", { class: "field-error", "data-field-error": name });
    input.insertAdjacentElement("afterend", box);
  }
  return box;
}

function clearFieldErrors(form) {
  form.querySelectorAll("[data-field-error]").forEach((box) => { box.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((input) => input.removeAttribute("aria-invalid"));
}

/** Show each message beside its field; returns the messages no field could take. */
function showFieldErrors(form, errors) {
  const left = [];
  errors.forEach(({ field, message }) => {
    const box = field && fieldErrorBox(form, field);
    if (!box) { left.push(message); return; }
    box.textContent = box.textContent ? `${box.textContent} ${message}` : message;
    const input = form.elements[field];
    if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
  });
  return left;
}

/** The hub's validation errors (FastAPI's detail list) as {field, message}, or null. */
function fieldErrorsOf(body) {
  const detail = body && body.detail;
  if (!Array.isArray(detail)) return null;
  return detail.map((e) => {
    const path = (e.loc || []).filter((p) => p !== "body");
    let field = path[path.length - 1];
    if (path[0] === "limits" || path[0] === "cohort") field = path[1];
    if (field === "spoke_ids" && e.type === "too_short") return { field, message: "Choose at least one target spoke." };
    return { field: String(field ?? ""), message: e.msg };
  });
}

/** Checks of one argument against its schema entry, as the hub makes them (a subset of
 * JSON Schema: type, enum, ranges, length); the hub's own check stays the authority. */
function argumentProblem(spec, value) {
  if (value === undefined) return null;
  const type = spec.type;
  if (Array.isArray(spec.enum) && !spec.enum.some((v) => JSON.stringify(v) === JSON.stringify(value))) {
    return `must be one of ${spec.enum.map((v) => JSON.stringify(v)).join(", ")}`;
  }
  if (type === "integer" && !Number.isInteger(value)) return "must be a whole number";
  if (type === "number" && (typeof value !== "number" || !Number.isFinite(value))) return "must be a number";
  if (type === "boolean" && typeof value !== "boolean") return "must be true or false";
  if (type === "string" && typeof value !== "string") return "must be text";
  if (typeof value === "number") {
    if (spec.minimum !== undefined && value < spec.minimum) return `must be at least ${spec.minimum}`;
    if (spec.maximum !== undefined && value > spec.maximum) return `must be at most ${spec.maximum}`;
    if (spec.exclusiveMinimum !== undefined && value <= spec.exclusiveMinimum) return `must be more than ${spec.exclusiveMinimum}`;
    if (spec.exclusiveMaximum !== undefined && value >= spec.exclusiveMaximum) return `must be less than ${spec.exclusiveMaximum}`;
  }
  if (typeof value === "string") {
    if (spec.minLength !== undefined && value.length < spec.minLength) return `must have at least ${spec.minLength} characters`;
    if (spec.maxLength !== undefined && value.length > spec.maxLength) return `must have at most ${spec.maxLength} characters`;
  }
  return null;
}

/** One input for a schema property: a list for an enum, a check box for a boolean, a
 * number input with the schema's range, a text input, or JSON for anything else. */
function argumentInput(key, spec) {
  const id = `arg-${key}`;
  const attrs = { id, name: `arg:${key}`, "data-arg": key };
  let input;
  if (Array.isArray(spec.enum)) {
    input = el("select", attrs, spec.enum.map((v) => el("option", { value: JSON.stringify(v) }, String(v))));
    input.dataset.kind = "enum";
  } else if (spec.type === "boolean") {
    input = el("input", { ...attrs, type: "checkbox" });
    input.dataset.kind = "boolean";
  } else if (spec.type === "integer" || spec.type === "number") {
    const range = { type: "number", step: spec.type === "integer" ? "1" : "any" };
    if (spec.minimum !== undefined) range.min = spec.minimum;
    if (spec.maximum !== undefined) range.max = spec.maximum;
    input = el("input", { ...attrs, ...range });
    input.dataset.kind = spec.type;
  } else if (spec.type === "string") {
    input = el("input", { ...attrs, type: "text" });
    if (spec.maxLength !== undefined) input.maxLength = spec.maxLength;
    input.dataset.kind = "string";
  } else {
    input = el("textarea", { ...attrs, rows: "2", spellcheck: "false" });
    input.dataset.kind = "json";
  }
  const hint = [spec.description, spec.default !== undefined ? `Default: ${JSON.stringify(spec.default)}.` : ""]
    .filter(Boolean).join(" ");
  const label = el("label", { for: id }, `${spec.title || key} `, hint ? el("span", { class: "hint" }, hint) : "");
  const box = el("p", { class: "field-error", "data-field-error": `arguments.${key}` });
  const wrap = el("div", { class: "argument-field", "data-argument": key });
  if (input.dataset.kind === "boolean") wrap.append(el("label", { class: "check" }, input, ` ${spec.title || key}`), label.querySelector(".hint") || "", box);
  else wrap.append(label, input, box);
  return wrap;
}

/** The value a generated input holds (undefined: left empty, so not sent). */
function inputValue(input) {
  const kind = input.dataset.kind;
  if (kind === "boolean") return input.checked;
  if (kind === "enum") return JSON.parse(input.value);
  if (input.value === "") return undefined;
  if (kind === "integer" || kind === "number") return Number(input.value);
  if (kind === "json") {
    try { return JSON.parse(input.value); } catch (err) { return { __invalid: err.message }; }
  }
  return input.value;
}

function setInputValue(input, value) {
  const kind = input.dataset.kind;
  if (kind === "boolean") input.checked = value === true;
  else if (kind === "enum") input.value = JSON.stringify(value ?? JSON.parse(input.options[0].value));
  else if (value === undefined) input.value = "";
  else input.value = kind === "json" ? JSON.stringify(value) : String(value);
}

/** The file's bytes as base64 (the API takes the initial model inline). */
function fileAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error || new Error("the file could not be read"));
    reader.readAsDataURL(file);
  });
}

function wireNewTraining() {
  const form = document.getElementById("new-training");
  if (!form) return;
  const strategy = form.elements.strategy;
  const submit = document.getElementById("submit");
  const showOptimiser = () => {
    const server = ["fedadam", "fedyogi", "fedadagrad"].includes(strategy.value);
    form.querySelectorAll("[data-server-optimiser]").forEach((box) => { box.hidden = !server; });
  };
  strategy.addEventListener("change", showOptimiser);
  showOptimiser();
  const fail = (errors) => {
    const left = showFieldErrors(form, errors);
    showError(form, ["Not launched: check the fields marked below.", ...left].join("\n"));
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(form, "");
    clearFieldErrors(form);
    const problems = [];
    const algorithmId = form.elements.algorithm_id.value;
    if (!form.elements.name.value.trim()) problems.push({ field: "name", message: "Give the study a name." });
    if (!algorithmId) problems.push({ field: "algorithm_id", message: "Choose an approved algorithm version." });
    const spokes = [...form.querySelectorAll("input[name=spokes]:checked")].map((c) => c.value);
    if (spokes.length < 2) problems.push({ field: "spokes", message: "Choose at least two spokes." });
    const file = form.elements.initial_model.files[0];
    if (!file) problems.push({ field: "initial_model_b64", message: "Choose the initial model (safetensors)." });
    if (problems.length) { fail(problems); return; }
    const number = (name) => (form.elements[name].value === "" ? undefined : Number(form.elements[name].value));
    const body = { name: form.elements.name.value.trim(), algorithm_id: Number(algorithmId), spokes,
      strategy: strategy.value };
    if (form.elements.access_request_id && form.elements.access_request_id.value) {
      body.access_request_id = form.elements.access_request_id.value;
    }
    ["proximal_mu", "rounds", "min_participants", "round_deadline_s", "max_attempts",
      "clip_bound", "noise_multiplier", "epsilon_budget", "delta"].forEach((name) => {
      if (number(name) !== undefined) body[name] = number(name);
    });
    if (["fedadam", "fedyogi", "fedadagrad"].includes(strategy.value)) {
      ["server_lr", "beta_1", "beta_2", "tau"].forEach((name) => {
        if (number(name) !== undefined) body[name] = number(name);
      });
    }
    submit.disabled = true;
    let created;
    try {
      body.initial_model_b64 = await fileAsBase64(file);
      created = await api("POST", "/api/training-studies", body);
    } catch (err) {
      const detail = err.body && err.body.detail;
      const fields = fieldErrorsOf(err.body);
      if (fields) fail(fields);
      else if (detail && Array.isArray(detail.refusals)) {
        fail(detail.refusals.map((r) => ({ field: "spokes", message: `${r.spoke_id}: ${r.reason}.` })));
      } else showError(form, `Not launched: ${err.message}`);
      submit.disabled = false;
      return;
    }
    window.location.assign(`/training/${encodeURIComponent(created.id)}`);
  });
}

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
  const inputs = document.getElementById("argument-inputs");
  let properties = {};
  const showAggregator = () => {
    const chosen = aggregators.find((a) => a.name === aggregator.value);
    document.getElementById("aggregator-schema").textContent = chosen ? JSON.stringify(chosen.schema, null, 2) : "";
  };
  // The fields and the raw JSON stay in step: a field edited rewrites its key in the JSON
  // (other keys are kept), JSON edited by hand refills the fields.
  const fieldsToJson = () => {
    let current = {};
    try { current = JSON.parse(args.value || "{}"); } catch (err) { current = {}; }
    if (current === null || typeof current !== "object" || Array.isArray(current)) current = {};
    inputs.querySelectorAll("[data-arg]").forEach((input) => {
      const value = inputValue(input);
      if (value === undefined) delete current[input.dataset.arg];
      else current[input.dataset.arg] = value;
    });
    args.value = JSON.stringify(current, null, 2);
  };
  const jsonToFields = () => {
    let current;
    try { current = JSON.parse(args.value || "{}"); } catch (err) { return; }
    if (current === null || typeof current !== "object" || Array.isArray(current)) return;
    inputs.querySelectorAll("[data-arg]").forEach((input) => setInputValue(input, current[input.dataset.arg]));
  };
  const showAlgorithm = () => {
    const chosen = algorithms.find((a) => String(a.id) === select.value);
    if (!chosen) return;
    const schema = chosen.schema || {};
    properties = (schema.properties && typeof schema.properties === "object") ? schema.properties : {};
    inputs.replaceChildren(...Object.entries(properties).map(([key, spec]) => argumentInput(key, spec || {})));
    if (!Object.keys(properties).length) inputs.append(el("p", { class: "hint" }, "This version's schema names no arguments."));
    inputs.querySelectorAll("[data-arg]").forEach((input) => {
      input.addEventListener("input", fieldsToJson);
      input.addEventListener("change", fieldsToJson);
    });
    args.value = JSON.stringify(chosen.defaults, null, 2);
    jsonToFields();
    document.getElementById("schema").textContent = JSON.stringify(chosen.schema, null, 2);
    if (aggregators.some((a) => a.name === chosen.aggregator)) aggregator.value = chosen.aggregator;
    showAggregator();
  };
  select.addEventListener("change", showAlgorithm);
  args.addEventListener("input", jsonToFields);
  aggregator.addEventListener("change", showAggregator);
  launch.addEventListener("change", () => {
    submit.textContent = launch.checked ? "Create and launch" : "Save as draft";
  });
  showAlgorithm();

  /** Problems found before sending, each with its field. */
  const localProblems = (argumentsValue) => {
    const problems = [];
    if (!form.elements.name.value.trim()) problems.push({ field: "name", message: "Give the study a name." });
    if (!form.querySelector("input[name=spoke_ids]:checked")) problems.push({ field: "spoke_ids", message: "Choose at least one target spoke." });
    const required = (algorithms.find((a) => String(a.id) === select.value) || {}).schema?.required || [];
    Object.entries(properties).forEach(([key, spec]) => {
      const value = argumentsValue[key];
      if (value && value.__invalid) problems.push({ field: `arguments.${key}`, message: `not valid JSON (${value.__invalid})` });
      else if (value === undefined && required.includes(key)) problems.push({ field: `arguments.${key}`, message: "required" });
      else {
        const problem = argumentProblem(spec || {}, value);
        if (problem) problems.push({ field: `arguments.${key}`, message: problem });
      }
    });
    return problems;
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(form, "");
    clearFieldErrors(form);
    let argumentsValue;
    try {
      argumentsValue = JSON.parse(args.value || "{}");
    } catch (err) {
      showFieldErrors(form, [{ field: "arguments", message: `Raw JSON: not valid JSON (${err.message}).` }]);
      showError(form, "Not created: check the fields marked below.");
      return;
    }
    if (argumentsValue === null || typeof argumentsValue !== "object" || Array.isArray(argumentsValue)) {
      showFieldErrors(form, [{ field: "arguments", message: "Raw JSON: must be a JSON object, e.g. {\"threshold\": 0.5}." }]);
      showError(form, "Not created: check the fields marked below.");
      return;
    }
    let parameters;
    try {
      parameters = JSON.parse(form.elements.aggregator_parameters.value || "{}");
    } catch (err) {
      showFieldErrors(form, [{ field: "aggregator_parameters", message: `not valid JSON (${err.message}).` }]);
      showError(form, "Not created: check the fields marked below.");
      return;
    }
    const problems = localProblems(argumentsValue);
    if (problems.length) {
      const left = showFieldErrors(form, problems);
      showError(form, ["Not created: check the fields marked below.", ...left].join("\n"));
      return;
    }
    const number = (name) => (form.elements[name].value === "" ? null : Number(form.elements[name].value));
    const cohort = { modality: form.elements.modality.value.trim() || null };
    if (number("max_cases") !== null) cohort.max_cases = number("max_cases");
    const limits = { timeout_seconds: number("timeout_seconds"), memory_mb: number("memory_mb"),
      cpus: number("cpus"), gpus: number("gpus") ?? 0 };
    if (number("tmp_mb") !== null) limits.tmp_mb = number("tmp_mb");
    const body = {
      name: form.elements.name.value.trim(),
      algorithm_id: Number(select.value),
      arguments: argumentsValue,
      spoke_ids: [...form.querySelectorAll("input[name=spoke_ids]:checked")].map((c) => c.value),
      cohort,
      release: form.elements.release.value.split(",").map((s) => s.trim()).filter(Boolean),
      limits,
      expires_in_days: number("expires_in_days"),
      aggregator: aggregator.value,
      aggregator_parameters: parameters,
    };
    if (form.elements.access_request_id && form.elements.access_request_id.value) {
      body.access_request_id = form.elements.access_request_id.value;
    }
    submit.disabled = true;
    let created;
    try {
      created = await api("POST", "/api/experiments", body);
    } catch (err) {
      // The hub's validation errors go beside their fields; any other refusal above.
      const fields = fieldErrorsOf(err.body);
      if (fields) {
        const left = showFieldErrors(form, fields);
        showError(form, ["Not created: check the fields marked below.", ...left].join("\n"));
      } else {
        showError(form, `Not created: ${err.message}`);
      }
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

function progressCells(t) {
  const total = t.case_count || 0;
  const pct = (n) => (total ? `width:${(100 * n) / total}%` : "width:0");
  const known = t.case_count === null ? "unknown" : t.case_count;
  return [
    el("td", {}, `${t.spoke_id} `, el("span", { class: `badge ${t.spoke_online ? "ok" : "fail"}` },
      t.spoke_online ? "online" : "offline")),
    el("td", {}, badge(t.state),
      ...(t.withdrawn_at ? [" ", el("span", { class: "badge fail", "data-withdrawn": "",
        title: `withdrawn by the hub at ${t.withdrawn_at}: nothing it sends for the study counts` },
      "withdrawn")] : []),
      ...(t.reason ? [el("br"), el("small", {}, t.reason)] : []),
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
  // The case's own page: its log tail, exit code, limits and discarded files in full.
  const experimentId = window.location.pathname.split("/")[2] || "";
  const href = `/experiments/${encodeURIComponent(experimentId)}/cases/${encodeURIComponent(c.spoke_id)}/${encodeURIComponent(c.case_id)}`;
  return [el("td", {}, c.spoke_id), el("td", {}, el("a", { href, "data-case-link": "" }, el("code", {}, c.case_id))), el("td", {}, badge(c.state)),
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

// --- Live training study: round rows patched from the stream's deltas --------------------
const eps = (v) => (v === null || v === undefined ? "–" : Number(v.toPrecision(4)).toString());

/** The cells of one round attempt, as the template's round_cells macro draws them. */
function roundCells(r) {
  const drops = [];
  [["did not join", r.not_joined], ["dropped before masking (not in the sum)", r.dropped_before_masking],
    ["dropped after masking (update recovered)", r.dropped_after_masking]].forEach(([what, who]) => {
    if (!who.length) return;
    if (drops.length) drops.push(el("br"));
    drops.push(`${what}: ${who.join(", ")}`);
  });
  return [
    el("td", { class: "num" }, String(r.round), ...(r.attempt > 1 ? [el("br"), el("small", {}, `attempt ${r.attempt}`)] : [])),
    el("td", {}, badge(r.outcome), ...(r.outcome_reason ? [el("br"), el("small", {}, r.outcome_reason)] : [])),
    ...[r.targeted, r.joined, r.survived].map((l) => el("td", { class: "num" }, String(l.length))),
    el("td", {}, drops.length ? drops : "–"),
    ...[r.epsilon_round, r.epsilon_cumulative, r.mean_loss].map((v) => el("td", { class: "num" }, eps(v))),
    el("td", {}, r.global_model_out ? el("code", { title: r.global_model_out }, `${r.global_model_out.slice(7, 19)}…`) : "–"),
  ];
}

async function refreshTrainingSummary(root) {
  const response = await fetch(`/training/${root.dataset.study}/summary`, { credentials: "same-origin" });
  if (response.ok) document.getElementById("training-summary").innerHTML = await response.text();
}

function wireLiveTraining() {
  const root = document.getElementById("training");
  if (!root || !root.dataset.live || !window.EventSource) return;
  const live = document.getElementById("live");
  const source = new EventSource(root.dataset.live);
  let timer = null;
  let last = 0;
  const scheduleSummary = () => { // the curves are drawn on the hub: at most every 3 s
    if (timer) return;
    const wait = Math.max(0, last + 3000 - Date.now());
    timer = setTimeout(() => { timer = null; last = Date.now(); refreshTrainingSummary(root); }, wait);
  };
  source.addEventListener("open", () => { live.textContent = "live"; live.classList.add("on"); });
  source.addEventListener("error", () => { live.textContent = "reconnecting…"; live.classList.remove("on"); });
  source.addEventListener("progress", (event) => {
    const { study, rounds, delta } = JSON.parse(event.data);
    const state = document.getElementById("training-state");
    state.replaceWith(Object.assign(badge(study.state), { id: "training-state" }));
    root.dataset.state = study.state;
    const body = document.getElementById("rounds");
    rounds.forEach((r) => {
      const key = `${r.round}.${r.attempt}`;
      const row = el("tr", { "data-round": key }, roundCells(r));
      const old = [...body.children].find((x) => x.dataset.round === key);
      if (old) old.replaceWith(row); else body.append(row);
    });
    const none = document.getElementById("no-rounds");
    if (none && body.children.length) none.remove();
    if (delta) scheduleSummary();
  });
  source.addEventListener("end", () => {
    source.close();
    live.textContent = "finished";
    live.classList.remove("on");
    clearTimeout(timer);
    timer = "done";
    refreshTrainingSummary(root);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  wireLiveTraining();
  wireApiActions();
  wireNewExperiment();
  wireNewTraining();
  wireLiveExperiment();
  wireLiveList();
});

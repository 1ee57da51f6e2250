// Tributary dashboard: the data access pages. The request form goes to the API as
// multipart/form-data (its two files with it); the committee's decision as JSON. Both carry
// the page's CSRF token, like every other change made from the dashboard.
"use strict";

function accessCsrf() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

async function accessCall(url, init) {
  let response;
  try {
    response = await fetch(url, { credentials: "same-origin", ...init });
  } catch (err) {
    throw new Error(`The hub cannot be reached: ${err.message}`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && data.detail;
    if (typeof detail === "string") throw new Error(detail);
    if (detail && detail.message) throw new Error(detail.message);
    if (Array.isArray(detail)) throw new Error(detail.map((e) => `${(e.loc || []).slice(-1)[0]}: ${e.msg}`).join(" "));
    throw new Error(`The hub refused the request (HTTP ${response.status}).`);
  }
  return data;
}

function accessError(form, message) {
  const box = form.querySelector("[data-error]");
  if (box) box.textContent = message;
}

function wireAccessRequestForm() {
  const form = document.getElementById("new-access-request-form");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    accessError(form, "");
    const body = new FormData();
    body.append("title", form.elements.title.value.trim());
    body.append("purpose", form.elements.purpose.value.trim());
    const spokes = [...form.querySelectorAll("input[name=spokes]:checked")].map((c) => c.value);
    const kinds = [...form.querySelectorAll("input[name=study_kinds]:checked")].map((c) => c.value);
    if (!spokes.length) { accessError(form, "Choose at least one spoke."); return; }
    if (!kinds.length) { accessError(form, "Choose at least one kind of study."); return; }
    spokes.forEach((s) => body.append("spokes", s));
    kinds.forEach((k) => body.append("study_kinds", k));
    body.append("attributes", form.elements.attributes.value);
    if (form.elements.k.value) body.append("k", form.elements.k.value);
    if (form.elements.epsilon.value) body.append("epsilon", form.elements.epsilon.value);
    for (const name of ["ethics", "dpia"]) {
      const file = form.elements[name].files[0];
      if (!file) { accessError(form, "Attach the ethics approval and the DPIA."); return; }
      body.append(name, file);
    }
    const submit = document.getElementById("submit");
    submit.disabled = true;
    try {
      const created = await accessCall("/api/access-requests", {
        method: "POST", body, headers: { Accept: "application/json", "X-CSRF-Token": accessCsrf() } });
      window.location.assign(`/access-requests/${encodeURIComponent(created.id)}`);
    } catch (err) {
      accessError(form, `Not filed: ${err.message}`);
      submit.disabled = false;
    }
  });
}

function wireDecisionForm() {
  const form = document.getElementById("decision-form");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    accessError(form, "");
    const decision = event.submitter ? event.submitter.value : "approve";
    const checked = (name) => [...form.querySelectorAll(`input[name=${name}]:checked`)].map((c) => c.value);
    const body = { decision, reason: form.elements.reason.value.trim() };
    if (decision === "approve") {
      body.spokes = checked("spokes");
      body.attributes = checked("attributes");
      body.study_kinds = checked("study_kinds");
      if (form.elements.min_k.value) body.min_k = Number(form.elements.min_k.value);
      if (form.elements.epsilon_budget.value) body.epsilon_budget = Number(form.elements.epsilon_budget.value);
      if (form.elements.expires_at.value) body.expires_at = `${form.elements.expires_at.value}T23:59:59Z`;
    }
    try {
      await accessCall(`/api/access-requests/${encodeURIComponent(form.dataset.request)}/decision`, {
        method: "POST", body: JSON.stringify(body),
        headers: { Accept: "application/json", "Content-Type": "application/json", "X-CSRF-Token": accessCsrf() } });
      window.location.reload();
    } catch (err) {
      accessError(form, `Not recorded: ${err.message}`);
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  wireAccessRequestForm();
  wireDecisionForm();
});

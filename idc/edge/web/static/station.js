// Shared helpers of the review station's pages. Same-origin requests carry the session cookie;
// changes also send X-IDC-Station (a cross-site form cannot), see idc/edge/web/auth.py.
"use strict";
const Station = {
  headers(extra) { return Object.assign({"X-IDC-Station": "1"}, extra || {}); },
  status(text, isError) {
    const el = document.getElementById("status");
    el.textContent = text;
    el.classList.toggle("error", !!isError);
  },
  async failure(response) {
    if (response.status === 401) { window.location.reload(); return "the API key is needed again"; }
    try { return (await response.json()).ResponseMessage || response.statusText; }
    catch (e) { return `${response.status} ${response.statusText}`; }
  },
  async refreshCount() {
    const el = document.getElementById("queue-count");
    try {
      const r = await fetch("/api/review/queue?limit=1");
      if (r.ok) { const body = await r.json(); el.textContent = body.Pending ? String(body.Pending) : ""; }
    } catch (e) { /* the count is a hint only */ }
  },
  patchName: /^(?:.*\/)?([^_/]+)_idx5_x(\d+)_y(\d+)_class([01])\.png$/,
  percent(p) { return (100 * p).toFixed(1) + " %"; },
};
document.addEventListener("DOMContentLoaded", () => Station.refreshCount());

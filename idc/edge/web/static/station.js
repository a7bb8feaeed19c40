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
  // A file name as a reviewer sees it: without folders (the Kaggle layout's class folder) and without a
  // `_class<C>` suffix, so the true label never sits beside the verdict:
  // 9036/1/9036_idx5_x1001_y801_class1.png -> 9036_idx5_x1001_y801.
  displayName(name) {
    if (!name) return "";
    const base = name.split(/[\\/]/).pop();
    const kaggle = /^(.*)_class[01]\.[A-Za-z0-9]+$/.exec(base);
    return kaggle ? kaggle[1] : base;
  },
  p(value) { return value.toFixed(4); },  // P(IDC) as the pages show it
  // How far P(IDC) is from the threshold, the rule's way: "0.0165 above the threshold".
  margin(p, threshold) {
    if (!Number.isFinite(threshold)) return "";
    const d = p - threshold;
    return `${Math.abs(d).toFixed(4)} ${d >= 0 ? "above" : "below"} the threshold`;
  },
  // A UTC ISO time as "2026-11-26 02:54 UTC" in a <time> element (the full time as its title).
  time(iso) {
    const el = document.createElement("time");
    el.dateTime = iso || "";
    el.title = iso || "";
    const m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})/.exec(iso || "");
    el.textContent = m ? `${m[1]} ${m[2]} UTC` : (iso || "");
    return el;
  },
};
document.addEventListener("DOMContentLoaded", () => Station.refreshCount());

// The review queue: each queued patch with the model's verdict; the reviewer sets the label
// (IDC / no IDC / unsure) with a note. Most uncertain first (closest to the threshold), with filters.
// A whole slide's tile links to its place in the slide's viewer; /review?item=<id> (where the viewer
// links to) shows that one item until a filter is changed.
"use strict";
(() => {
  const queue = document.getElementById("queue");
  const reviewer = document.getElementById("reviewer");
  const filter = document.getElementById("filter"), order = document.getElementById("order");
  const needsReview = document.getElementById("needs-review"), disagreements = document.getElementById("disagreements");
  const patient = document.getElementById("patient");
  const threshold = parseFloat(document.body.dataset.threshold);
  const LABELS = {idc: "IDC", no_idc: "no IDC", unsure: "unsure"};
  let onlyItem = new URLSearchParams(window.location.search).get("item");
  reviewer.value = sessionStorage.getItem("idc-reviewer") || "";
  reviewer.addEventListener("change", () => sessionStorage.setItem("idc-reviewer", reviewer.value.trim()));

  function line(className) {
    const el = document.createElement("div");
    el.className = "line " + className;
    return el;
  }

  function card(item) {
    const el = document.createElement("article");
    el.className = "card";
    el.id = `item-${item.id}`;
    el.dataset.id = item.id;
    el.dataset.p = String(item.p_idc);
    el.dataset.label = item.label ? "idc" : "no_idc";
    el.innerHTML = `<img alt="patch"><div class="meta"></div>
      <div class="act"><div class="actions" role="group" aria-label="the reviewer's label">
        <button type="button" class="label-idc" data-label="idc">IDC</button>
        <button type="button" class="label-no_idc" data-label="no_idc">no IDC</button>
        <button type="button" class="label-unsure" data-label="unsure">unsure</button></div>
        <textarea placeholder="note (optional)" maxlength="2000" aria-label="note"></textarea></div>`;
    el.querySelector("img").src = `/api/review/items/${item.id}/image`;
    const meta = el.querySelector(".meta");

    const model = line("model");
    model.innerHTML = `<span class="who">Model:</span> <strong class="verdict-${item.label}"></strong>` +
      ` · P(IDC) <span class="p"></span>` + (item.needs_review ? ` <span class="flag">needs review</span>` : "") +
      (Number.isFinite(threshold) ? ` · <span class="margin"></span>` : "");
    model.querySelector("strong").textContent = item.label ? "IDC" : "no IDC";
    model.querySelector(".p").textContent = Station.p(item.p_idc);
    if (Number.isFinite(threshold)) model.querySelector(".margin").textContent = Station.margin(item.p_idc, threshold);

    const name = line("name");
    name.textContent = Station.displayName(item.name) || "(no file name)";
    name.title = name.textContent;
    if (item.slide) {
      const where = document.createElement("span");
      where.className = "where";
      where.textContent = ` · slide ${item.slide} (x ${item.slide_x}, y ${item.slide_y})`;
      const link = document.createElement("a");
      link.className = "on-slide";
      link.textContent = "on the slide";
      link.href = `/slides/${encodeURIComponent(item.slide)}?` +
        new URLSearchParams({x: item.slide_x, y: item.slide_y, size: item.slide_size});
      name.append(where, link);
    } else if (item.patient) {
      const where = document.createElement("span");
      where.className = "where";
      where.textContent = ` · patient ${item.patient} (x ${item.x}, y ${item.y})`;
      name.appendChild(where);
    }
    const when = line("when");
    when.append("queued ", Station.time(item.created_at));
    meta.append(model, name, when, line("reviewed"));

    el.querySelector("textarea").value = item.note || "";
    showReview(el, item);
    for (const button of el.querySelectorAll(".actions button")) {
      button.addEventListener("click", () => setLabel(el, item.id, button.dataset.label));
    }
    return el;
  }

  function showReview(el, item) {
    const reviewed = el.querySelector(".reviewed");
    el.dataset.reviewLabel = item.review_label || "";
    el.dataset.decision = item.decision || "";
    el.classList.toggle("done", !!item.review_label);
    el.classList.toggle("disagrees", item.decision === "disagree");
    for (const button of el.querySelectorAll(".actions button")) {
      button.setAttribute("aria-pressed", String(button.dataset.label === item.review_label));
    }
    reviewed.replaceChildren();
    if (!item.review_label) { reviewed.textContent = "Not reviewed yet"; return; }
    const label = document.createElement("strong");
    label.textContent = LABELS[item.review_label];
    label.className = item.review_label === "unsure" ? "" : `verdict-${item.review_label === "idc" ? 1 : 0}`;
    reviewed.append("Reviewed: ", label);
    if (item.reviewer) {
      const who = document.createElement("span");
      who.className = "reviewer";
      who.textContent = item.reviewer;
      reviewed.append(", by ", who);
    }
    reviewed.append(", at ", Station.time(item.reviewed_at));
    if (item.decision === "disagree") {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "differs from the model";
      reviewed.append(" ", badge);
    }
  }

  async function setLabel(el, id, label) {
    const response = await fetch(`/api/review/items/${id}`, {
      method: "POST", headers: Station.headers({"Content-Type": "application/json"}),
      body: JSON.stringify({label, note: el.querySelector("textarea").value, reviewer: reviewer.value.trim()}),
    });
    if (!response.ok) { Station.status(`not saved: ${await Station.failure(response)}`, true); return; }
    const item = (await response.json()).Item;
    showReview(el, item);
    Station.status(`item ${id} saved: ${LABELS[item.review_label]}` +
      (item.decision === "disagree" ? " (the model said " + (item.label ? "IDC" : "no IDC") + ")" : ""));
    Station.refreshCount();
  }

  function fillPatients(patients) {
    const chosen = patient.value;
    const options = [new Option("all", "")].concat(patients.map(p => new Option(p, p)));
    patient.replaceChildren(...options);
    patient.value = patients.includes(chosen) ? chosen : "";
  }

  let loads = 0;  // only the latest load fills the queue (filters changed quickly)
  async function load() {
    const seq = ++loads;
    queue.dataset.loaded = "no";
    const query = new URLSearchParams({status: onlyItem ? "all" : filter.value, order: order.value, limit: "200"});
    if (onlyItem) query.set("item", onlyItem);
    if (needsReview.checked) query.set("needs_review", "1");
    if (disagreements.checked) query.set("disagreements", "1");
    if (patient.value) query.set("patient", patient.value);
    const response = await fetch(`/api/review/queue?${query}`);
    if (seq !== loads) return;
    if (!response.ok) { Station.status(await Station.failure(response), true); queue.dataset.loaded = "error"; return; }
    const body = await response.json();
    if (seq !== loads) return;
    fillPatients(body.Patients);
    queue.replaceChildren(...body.Items.map(card));
    const shown = body.Items.length < body.Matching ? `${body.Items.length} of ${body.Matching}` : `${body.Matching}`;
    Station.status(`${shown} shown · ${body.Pending} waiting, ${body.Reviewed} reviewed`);
    if (onlyItem) showingOne(body.Items[0]);
    if (!body.Items.length) {
      const empty = document.createElement("p");
      empty.className = "empty";
      empty.textContent = "Nothing here with these filters.";
      queue.replaceChildren(empty);
    }
    queue.dataset.loaded = "yes";
  }

  // /review?item=<id>: a line above the queue says so and leads to the whole queue (or the item's slide).
  function showingOne(item) {
    document.getElementById("only-item")?.remove();
    const note = document.createElement("p");
    note.id = "only-item";
    note.className = "only-item";
    note.append(item ? `Item ${item.id} only` + (item.slide ? ` (a tile of slide ${item.slide}). ` : ". ")
      : `No review item ${onlyItem}. `);
    const all = document.createElement("a");
    all.href = "/review";
    all.textContent = "Show the whole queue";
    all.addEventListener("click", event => { event.preventDefault(); allItems(); });
    note.append(all);
    if (item && item.slide) {
      const slide = document.createElement("a");
      slide.href = `/review`;
      slide.textContent = `this slide's items`;
      slide.addEventListener("click", event => { event.preventDefault(); allItems(item.slide); });
      note.append(" · ", slide);
    }
    queue.before(note);
  }

  function leaveOne() {  // the filters apply again
    onlyItem = null;
    document.getElementById("only-item")?.remove();
    window.history.replaceState(null, "", "/review");
  }

  function allItems(slide) {
    leaveOne();
    if (slide) {
      filter.value = "all";
      patient.replaceChildren(new Option(slide, slide));
      patient.value = slide;
    }
    load();
  }

  // A disagreement is a reviewed item: "disagreements only" shows reviewed items, "waiting" clears it.
  disagreements.addEventListener("change", () => {
    if (disagreements.checked && filter.value === "pending") filter.value = "reviewed";
    load();
  });
  filter.addEventListener("change", () => {
    if (filter.value === "pending") disagreements.checked = false;
    load();
  });
  for (const control of [order, needsReview, patient]) control.addEventListener("change", load);
  for (const control of [filter, order, needsReview, disagreements, patient]) {
    control.addEventListener("change", () => { if (onlyItem) leaveOne(); }, {capture: true});
  }
  load();
})();

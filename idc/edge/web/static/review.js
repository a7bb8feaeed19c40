// The review queue: each flagged patch with its verdict; agree / disagree / unsure with a note.
"use strict";
(() => {
  const queue = document.getElementById("queue");
  const reviewer = document.getElementById("reviewer");
  const filter = document.getElementById("filter");
  reviewer.value = sessionStorage.getItem("idc-reviewer") || "";
  reviewer.addEventListener("change", () => sessionStorage.setItem("idc-reviewer", reviewer.value.trim()));

  function card(item) {
    const el = document.createElement("article");
    el.className = "card" + (item.decision ? " done" : "");
    el.dataset.id = item.id;
    el.innerHTML = `<img alt="patch"><div class="meta">
        <div><span class="verdict-${item.label}"></span> · P(IDC) <span class="p"></span>
          ${item.needs_review ? '<span class="flag">needs review</span>' : ""}</div>
        <div class="name"></div><div class="when"></div><div class="decision"></div>
        <textarea placeholder="note (optional)" maxlength="2000"></textarea></div>
      <div class="actions"><button class="agree">Agree</button><button class="disagree">Disagree</button>
        <button class="unsure">Unsure</button></div>`;
    el.querySelector("img").src = `/api/review/items/${item.id}/image`;
    el.querySelector(`.verdict-${item.label}`).textContent = item.label ? "IDC" : "no IDC";
    el.querySelector(".p").textContent = item.p_idc.toFixed(4);
    el.querySelector(".name").textContent = item.name || "(no file name)";
    el.querySelector(".when").textContent = `queued ${item.created_at}` + (item.patient ? ` · patient ${item.patient} (${item.x}, ${item.y})` : "");
    el.querySelector("textarea").value = item.note || "";
    showDecision(el, item);
    for (const decision of ["agree", "disagree", "unsure"]) {
      el.querySelector(`button.${decision}`).addEventListener("click", () => decide(el, item.id, decision));
    }
    return el;
  }

  function showDecision(el, item) {
    el.querySelector(".decision").textContent = item.decision
      ? `${item.decision}${item.reviewer ? " by " + item.reviewer : ""} at ${item.reviewed_at}` : "";
    el.dataset.decision = item.decision || "";
  }

  async function decide(el, id, decision) {
    const response = await fetch(`/api/review/items/${id}`, {
      method: "POST", headers: Station.headers({"Content-Type": "application/json"}),
      body: JSON.stringify({decision, note: el.querySelector("textarea").value, reviewer: reviewer.value.trim()}),
    });
    if (!response.ok) { Station.status(`not saved: ${await Station.failure(response)}`, true); return; }
    const item = (await response.json()).Item;
    el.classList.add("done");
    showDecision(el, item);
    Station.status(`item ${id}: ${decision} saved`);
    Station.refreshCount();
  }

  async function load() {
    const response = await fetch(`/api/review/queue?status=${filter.value}&limit=200`);
    if (!response.ok) { Station.status(await Station.failure(response), true); queue.dataset.loaded = "error"; return; }
    const body = await response.json();
    queue.replaceChildren(...body.Items.map(card));
    Station.status(`${body.Pending} waiting, ${body.Reviewed} reviewed`);
    queue.dataset.loaded = "yes";
  }

  filter.addEventListener("change", load);
  load();
})();

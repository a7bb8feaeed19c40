// The classify page: drop images or a patient's zip, stream verdicts from POST /api/infer/batch
// (NDJSON), and draw each patient's mosaic with the P(IDC) overlay beside the results: a click on a
// mosaic cell scrolls to its result row and highlights it; a row's "on the slide" button marks its cell.
"use strict";
(() => {
  const body = document.body;
  const threshold = parseFloat(body.dataset.threshold || "0.5");
  const maxUpload = parseInt(body.dataset.maxUpload, 10);
  const maxFiles = parseInt(body.dataset.maxFiles, 10);
  const tbody = document.querySelector("#results tbody");
  const mosaics = new Map();  // patient -> {section, canvas, cells: file -> cell, extent, minX, minY, scale, selected}
  let counts = {done: 0, idc: 0, review: 0, failed: 0, total: 0}, rows = 0;

  function summary() {
    document.getElementById("summary").textContent =
      `${counts.done} of ${counts.total} classified: IDC ${counts.idc}, no IDC ${counts.done - counts.idc - counts.failed}, ` +
      `needs review ${counts.review}, failed ${counts.failed}`;
  }

  function overlay(p) {  // blue (no IDC) -> red (IDC), through pale at the threshold
    if (p >= threshold) return `rgba(192,57,43,${(0.2 + 0.35 * (p - threshold) / (1 - threshold)).toFixed(3)})`;
    return `rgba(36,113,163,${(0.15 + 0.3 * (threshold - p) / threshold).toFixed(3)})`;
  }

  function prepareMosaics(names) {
    const byPatient = new Map();
    for (const name of names) {
      const m = Station.patchName.exec(name);
      if (!m) continue;
      const list = byPatient.get(m[1]) || [];
      list.push([parseInt(m[2], 10), parseInt(m[3], 10)]);
      byPatient.set(m[1], list);
    }
    for (const [patient, cells] of byPatient) {
      let mosaic = mosaics.get(patient);
      if (!mosaic) {
        const section = document.createElement("div");
        section.className = "mosaic";
        section.dataset.patient = patient;
        section.innerHTML = `<h2>Patient <span class="patient"></span>: <span class="count"></span></h2>
          <canvas title="click a patch to see its result"></canvas>
          <div class="legend"><span>no IDC</span><span class="ramp"></span><span>IDC</span>
          <span><span class="flag">&nbsp;</span> needs review</span>
          <label><input type="checkbox" class="show-overlay" checked> P(IDC) overlay</label></div>`;
        section.querySelector(".patient").textContent = patient;
        document.getElementById("mosaics").appendChild(section);
        document.getElementById("workspace").classList.add("with-mosaic");
        mosaic = {section, canvas: section.querySelector("canvas"), cells: new Map(), extent: [], selected: null};
        section.querySelector(".show-overlay").addEventListener("change", () => redraw(mosaic));
        mosaic.canvas.addEventListener("click", event => clickMosaic(mosaic, event));
        mosaics.set(patient, mosaic);
      }
      mosaic.extent = mosaic.extent.concat(cells);
      const xs = mosaic.extent.map(c => c[0]), ys = mosaic.extent.map(c => c[1]);
      mosaic.minX = Math.min(...xs); mosaic.minY = Math.min(...ys);
      const width = Math.max(...xs) - mosaic.minX + 50, height = Math.max(...ys) - mosaic.minY + 50;
      mosaic.scale = Math.min(1, 1000 / width, 1000 / height);
      mosaic.canvas.width = Math.ceil(width * mosaic.scale);
      mosaic.canvas.height = Math.ceil(height * mosaic.scale);
      redraw(mosaic);
    }
  }

  function drawCell(mosaic, cell) {
    const ctx = mosaic.canvas.getContext("2d"), s = mosaic.scale;
    const x = (cell.x - mosaic.minX) * s, y = (cell.y - mosaic.minY) * s, w = 50 * s;
    if (cell.image) ctx.drawImage(cell.image, x, y, cell.image.width * s, cell.image.height * s);
    if (mosaic.section.querySelector(".show-overlay").checked) {
      ctx.fillStyle = overlay(cell.p);
      ctx.fillRect(x, y, w, w);
    }
    if (cell.review) {
      ctx.strokeStyle = "#d4ac0d"; ctx.lineWidth = Math.max(1, 3 * s);
      ctx.strokeRect(x + 1, y + 1, w - 2, w - 2);
    }
  }

  function drawSelected(mosaic) {
    const cell = mosaic.cells.get(mosaic.selected);
    if (!cell) return;
    const ctx = mosaic.canvas.getContext("2d"), s = mosaic.scale;
    const x = (cell.x - mosaic.minX) * s, y = (cell.y - mosaic.minY) * s, w = 50 * s, line = Math.max(2, 3 * s);
    ctx.lineWidth = line;
    ctx.strokeStyle = "#000"; ctx.strokeRect(x + line / 2, y + line / 2, w - line, w - line);
    ctx.strokeStyle = "#fff"; ctx.strokeRect(x + 1.5 * line, y + 1.5 * line, w - 3 * line, w - 3 * line);
  }

  function redraw(mosaic) {
    const ctx = mosaic.canvas.getContext("2d");
    ctx.clearRect(0, 0, mosaic.canvas.width, mosaic.canvas.height);
    for (const cell of mosaic.cells.values()) drawCell(mosaic, cell);
    drawSelected(mosaic);
    const n = mosaic.cells.size, idc = [...mosaic.cells.values()].filter(c => c.p >= threshold).length;
    mosaic.section.querySelector(".count").textContent = `${n} patches, ${idc} IDC`;
    mosaic.section.dataset.cells = String(n);
  }

  // Select one patch of a mosaic: its row highlighted, its cell framed; reveal the row or the cell.
  function select(mosaic, file, reveal) {
    for (const other of mosaics.values()) {
      if (other !== mosaic && other.selected) { other.selected = null; other.section.dataset.selected = ""; redraw(other); }
    }
    const cell = mosaic.cells.get(file);
    if (!cell) return;
    for (const row of tbody.querySelectorAll("tr.selected")) row.classList.remove("selected");
    cell.row.classList.add("selected");
    mosaic.selected = file;
    mosaic.section.dataset.selected = cell.row.id;
    redraw(mosaic);
    if (reveal === "row") {
      cell.row.scrollIntoView({block: "center"});
      cell.row.focus({preventScroll: true});
    } else {
      mosaic.section.scrollIntoView({block: "nearest"});
    }
  }

  function clickMosaic(mosaic, event) {
    const rect = mosaic.canvas.getBoundingClientRect();
    const x = (event.clientX - rect.left) * (mosaic.canvas.width / rect.width) / mosaic.scale + mosaic.minX;
    const y = (event.clientY - rect.top) * (mosaic.canvas.height / rect.height) / mosaic.scale + mosaic.minY;
    for (const [file, cell] of mosaic.cells) {
      if (x >= cell.x && x < cell.x + 50 && y >= cell.y && y < cell.y + 50) { select(mosaic, file, "row"); return; }
    }
  }

  function loadImage(src) {
    return new Promise(resolve => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => resolve(null);
      img.src = src;
    });
  }

  async function show(result, localFiles) {
    counts.done++;
    const row = document.createElement("tr");
    const local = localFiles.get(result.File);
    const src = result.Image || (local ? URL.createObjectURL(local) : "");
    const name = Station.displayName(result.File);  // never the class a Kaggle name carries
    row.id = `result-${++rows}`;
    row.tabIndex = -1;
    row.dataset.file = name;
    if (result.Response !== "OK") {
      counts.failed++;
      row.className = "failed";
      row.dataset.verdict = "failed";
      row.innerHTML = `<td></td><td class="file"></td><td colspan="4" class="why"></td>`;
      row.children[1].textContent = row.children[1].title = name;
      row.children[2].textContent = `failed (${result.Status}): ${result.ResponseMessage}`;
    } else {
      counts.idc += result.Results;
      counts.review += result.NeedsReview ? 1 : 0;
      row.dataset.verdict = result.Results ? "IDC" : "no IDC";
      row.dataset.p = String(result.Confidence);
      row.innerHTML = `<td><img alt=""></td><td class="file"></td><td class="verdict-${result.Results}"></td>` +
        `<td class="p"></td><td></td><td class="slide"></td>`;
      if (src) row.querySelector("img").src = src;
      row.children[1].textContent = row.children[1].title = name;
      row.children[2].textContent = result.Results ? "IDC" : "no IDC";
      row.children[3].textContent = Station.p(result.Confidence);
      row.children[3].title = Station.margin(result.Confidence, threshold);
      if (result.NeedsReview) {
        row.children[4].innerHTML = `<a class="flag" href="/review">needs review</a>`;
      }
      if (result.Patient !== null && mosaics.has(result.Patient)) {
        const mosaic = mosaics.get(result.Patient);
        const cell = {x: result.X, y: result.Y, p: result.Confidence, review: result.NeedsReview, image: null, row};
        mosaic.cells.set(result.File, cell);
        row.dataset.patient = result.Patient;
        row.dataset.x = String(result.X);
        row.dataset.y = String(result.Y);
        const locate = document.createElement("button");
        locate.type = "button";
        locate.className = "locate";
        locate.title = `show it on patient ${result.Patient}'s mosaic`;
        locate.textContent = `x ${result.X}, y ${result.Y}`;
        locate.addEventListener("click", () => select(mosaic, result.File, "cell"));
        row.children[5].appendChild(locate);
        drawCell(mosaic, cell);
        if (src) loadImage(src).then(img => { cell.image = img; drawCell(mosaic, cell); });
        mosaic.section.querySelector(".count").textContent = `${mosaic.cells.size} patches`;
        mosaic.section.dataset.cells = String(mosaic.cells.size);
      }
    }
    tbody.appendChild(row);
    document.getElementById("results").hidden = false;
    summary();
  }

  async function send(formData, withImages, localFiles) {
    const response = await fetch("/api/infer/batch" + (withImages ? "?images=1" : ""), {
      method: "POST", body: formData, headers: Station.headers({"Accept": "application/x-ndjson"}),
    });
    if (!response.ok) throw new Error(await Station.failure(response));
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", first = true;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        if (!line) continue;
        const message = JSON.parse(line);
        if (first) {
          first = false;
          if (withImages) { counts.total += message.Count; prepareMosaics(message.Files); }
          continue;
        }
        if (message.Context) continue;  // the batch's slide-context line: the page shows patch-alone verdicts
        await show(message, localFiles);
      }
    }
  }

  async function classify(fileList) {
    const files = [...fileList];
    if (!files.length) return;
    const zips = files.filter(f => /\.zip$/i.test(f.name) || f.type.includes("zip"));
    const images = files.filter(f => !zips.includes(f));
    const started = performance.now();
    counts.total += images.length;
    summary();
    Station.status(`classifying ${files.length} file(s)…`);
    prepareMosaics(images.map(f => f.name));
    const localFiles = new Map(images.map(f => [f.name, f]));
    try {
      // Loose images: requests under the server's limits, verdicts shown as each streams back.
      let chunk = new FormData(), size = 0, n = 0;
      for (const file of images) {
        if (n && (size + file.size > maxUpload * 0.9 || n >= Math.min(maxFiles, 64))) {
          await send(chunk, false, localFiles);
          chunk = new FormData(); size = 0; n = 0;
        }
        chunk.append("file", file, file.name); size += file.size; n++;
      }
      if (n) await send(chunk, false, localFiles);
      for (const zip of zips) {
        const form = new FormData();
        form.append("file", zip, zip.name);
        await send(form, true, new Map());
      }
      const seconds = ((performance.now() - started) / 1000).toFixed(2);
      Station.status(`done in ${seconds} s`);
      document.body.dataset.lastSeconds = seconds;
    } catch (err) {
      Station.status(`failed: ${err.message}`, true);
    }
    Station.refreshCount();
  }

  const drop = document.getElementById("drop");
  drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); classify(e.dataTransfer.files); });
  const input = document.getElementById("files");
  input.addEventListener("change", () => { classify(input.files); input.value = ""; });
})();

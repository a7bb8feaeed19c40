// The Slides pages. The list (/slides): every slide the server knows, its status and progress (polling
// GET /api/slides), and an upload (the raw file, POST /api/slides?name=). The viewer (/slides/<id>):
// the slide in OpenSeadragon (Deep Zoom tiles from the server), the P(IDC) overlay (overlay.png: one
// pixel per grid tile, drawn unsmoothed so tiles stay square) that can be hidden and faded, the tiles
// to review framed (a click on one opens its review item), the summary and the downloads. The
// overlay and the frames are one SVG layer over OpenSeadragon's canvas, in the slide's level-0 pixels,
// moved with the view at every frame it draws.
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";

  function element(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  const known = value => value !== undefined && value !== null;
  function count(value) { return known(value) ? String(value) : ""; }
  function mm2(value) { return known(value) ? value.toFixed(value < 10 ? 2 : 1) : ""; }
  function share(value) { return known(value) ? `${(100 * value).toFixed(1)} %` : ""; }
  function gb(bytes) { return `${(bytes / 1e9).toFixed(2)} GB`; }

  // --- the list ---

  function listPage() {
    const tbody = document.querySelector("#slides tbody");
    const empty = document.getElementById("no-slides");
    const input = document.getElementById("slide-file");
    const maxBytes = parseInt(document.body.dataset.maxSlide, 10);
    let timer = null;

    function row(slide) {
      const tr = element("tr");
      tr.dataset.id = slide.id;
      tr.dataset.status = slide.status;
      const name = element("td", "file");
      const link = element("a", "", slide.file);
      link.href = slide.viewer;
      link.title = `${slide.file} (${slide.id})`;
      name.append(link);
      const state = element("td", `state state-${slide.status}`);
      const word = element("span", "word", slide.status);
      state.append(word);
      if (slide.status === "running" && slide.progress.total) {
        const bar = element("progress");
        bar.max = slide.progress.total;
        bar.value = slide.progress.done;
        state.append(" ", bar);
      }
      state.title = slide.message || "";
      if (slide.message && slide.status !== "done") state.append(element("span", "message", ` ${slide.message}`));
      const f = slide.figures || {};
      tr.append(name, state, element("td", "n", count(f.tiles)), element("td", "n", mm2(f.tissue_mm2)),
        element("td", "n", mm2(f.idc_area_mm2)), element("td", "n", share(f.idc_share)),
        element("td", "n", count(f.tiles_to_review)));
      return tr;
    }

    async function refresh() {
      clearTimeout(timer);
      let active = false;
      try {
        const response = await fetch("/api/slides");
        if (!response.ok) { Station.status(await Station.failure(response), true); return; }
        const slides = (await response.json()).Slides;
        tbody.replaceChildren(...slides.map(row));
        empty.hidden = slides.length > 0;
        document.getElementById("slides").dataset.loaded = "yes";
        active = slides.some(s => s.status === "queued" || s.status === "running");
      } catch (e) {
        Station.status("the server does not answer: trying again", true);
      } finally {
        timer = setTimeout(refresh, active ? 1500 : 5000);  // faster while a slide is being analysed
      }
    }

    function upload(file) {
      if (file.size > maxBytes) {
        Station.status(`${file.name} is ${gb(file.size)}: the limit is ${gb(maxBytes)}`, true);
        return;
      }
      // XMLHttpRequest, not fetch: it reports the upload's progress (slides are large).
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `/api/slides?name=${encodeURIComponent(file.name)}`);
      for (const [key, value] of Object.entries(Station.headers({"Content-Type": "application/octet-stream"}))) {
        xhr.setRequestHeader(key, value);
      }
      xhr.upload.addEventListener("progress", event => {
        if (!event.lengthComputable) return;
        Station.status(`uploading ${file.name}: ${Math.floor(100 * event.loaded / event.total)} %`);
      });
      xhr.addEventListener("load", () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON: the status says enough */ }
        if (xhr.status === 401) { window.location.reload(); return; }
        if (xhr.status === 202) Station.status(body.ResponseMessage);
        else Station.status(`${file.name} not accepted: ${body.ResponseMessage || xhr.statusText || xhr.status}`, true);
        refresh();
      });
      xhr.addEventListener("error", () => Station.status(`${file.name}: the upload was cut off`, true));
      Station.status(`uploading ${file.name}`);
      xhr.send(file);
    }

    input.addEventListener("change", () => {
      if (input.files.length) upload(input.files[0]);
      input.value = "";
    });
    refresh();
  }

  // --- the viewer ---

  function svg(tag, attributes) {
    const el = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, String(value));
    return el;
  }

  function describe(slide) {
    const s = slide.summary, list = document.getElementById("figures");
    const rows = [
      ["tiles classified", `${s.tiles.classified} of ${s.tiles.grid}`],
      ["tissue", `${mm2(s.tissue.area_mm2)} mm²`],
      ["IDC", `${mm2(s.idc_area_mm2)} mm² · ${share(s.idc_share)} of the tiles (${s.idc_tiles})`],
      ["to review", String(s.tiles_to_review)],
      ["scale", `${s.slide.mpp} µm/px · tile ${Math.round(s.slide.tile_size)} px`],
    ];
    list.replaceChildren(...rows.flatMap(([term, value]) => [element("dt", "", term), element("dd", "", value)]));
    const rule = s.rule, band = rule.review_band;
    const context = !rule.context ? "" : rule.context.kind === "learned" ? " (learned slide context)"
      : ` (context radius ${rule.context.radius}, weight ${rule.context.weight})`;
    document.getElementById("slide-rule").textContent = `Rule: ${rule.answer}; IDC when P(IDC) \u2265 ` +
      `${rule.threshold}, needs review within \u00b1${band} of it${context}`;
    const downloads = document.getElementById("downloads");
    downloads.replaceChildren("Downloads: ");
    for (const [key, label] of [["tiles", "tiles CSV"], ["tiles_geojson", "tiles GeoJSON"],
      ["regions_geojson", "IDC regions GeoJSON"], ["heatmap", "heatmap PNG"], ["summary", "summary JSON"]]) {
      const a = element("a", "button", label);
      a.href = slide.files[key];
      a.setAttribute("download", "");
      downloads.append(a, " ");
    }
  }

  // The tissue tiles' answers from tiles.csv, by grid cell "column,row".
  async function tileAnswers(url, grid) {
    const cells = new Map();
    const response = await fetch(url);
    if (!response.ok) return cells;
    const lines = (await response.text()).trim().split("\n");
    const head = lines[0].split(",");
    const at = name => head.indexOf(name);
    const [x, y, p, idc] = [at("x"), at("y"), at("p_idc"), at("idc")];
    for (const line of lines.slice(1)) {
      const f = line.split(",");
      cells.set(grid.cell(+f[x], +f[y]), {p: +f[p], idc: f[idc] === "1"});
    }
    return cells;
  }

  async function viewerPage(id) {
    const view = document.getElementById("viewer");
    const response = await fetch(`/api/slides/${encodeURIComponent(id)}`);
    if (!response.ok) { Station.status(await Station.failure(response), true); return; }
    const slide = (await response.json()).Slide;
    document.getElementById("slide-name").textContent = slide.file;
    let said = "";  // what the page says of a slide not done
    if (slide.status !== "done") {
      said = `${slide.status}${slide.message ? ": " + slide.message : ""}` +
        (slide.status === "failed" ? "" : " (the results appear when it is done)");
      Station.status(said, slide.status === "failed");
      if (slide.status === "queued" || slide.status === "running") setTimeout(() => window.location.reload(), 3000);
    }
    const viewer = OpenSeadragon({
      element: view, prefixUrl: "/ui/openseadragon/images/", tileSources: slide.dzi,
      showNavigator: true, navigatorPosition: "BOTTOM_RIGHT", maxZoomPixelRatio: 4, visibilityRatio: 0.5,
      gestureSettingsMouse: {clickToZoom: false}, gestureSettingsTouch: {clickToZoom: false},
    });
    window.slideViewer = viewer;  // for the console and the browser tests
    viewer.addHandler("open-failed", event => {
      Station.status(`${said ? said + " · " : ""}the slide cannot be shown: ${event.message}`, true);
    });
    viewer.addHandler("open", () => {
      const image = viewer.world.getItemAt(0);
      const layer = svg("svg", {class: "slide-layer", "aria-hidden": "true"});
      const world = svg("g", {});
      layer.append(world);
      viewer.canvas.append(layer);
      // The image's level-0 pixels -> the viewer's pixels (no rotation): one scale and a shift.
      viewer.addHandler("update-viewport", () => {
        const a = image.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
        const b = image.imageToViewerElementCoordinates(new OpenSeadragon.Point(1e4, 0));
        world.setAttribute("transform", `matrix(${(b.x - a.x) / 1e4} 0 0 ${(b.x - a.x) / 1e4} ${a.x} ${a.y})`);
      });
      if (slide.status === "done") showResults(viewer, view, image, world, slide);
      const q = new URLSearchParams(window.location.search);
      const [x, y, size] = ["x", "y", "size"].map(k => parseInt(q.get(k), 10));
      if ([x, y, size].every(Number.isFinite) && size > 0) {
        world.append(svg("rect", {class: "picked", x, y, width: size, height: size,
          "vector-effect": "non-scaling-stroke"}));
        viewer.viewport.fitBounds(image.imageToViewportRectangle(x - 2 * size, y - 2 * size, 5 * size, 5 * size), true);
        view.dataset.picked = `${x},${y}`;
      }
      view.dataset.ready = "yes";
      viewer.forceRedraw();
    });
  }

  function showResults(viewer, view, image, world, slide) {
    const s = slide.summary.slide;
    const [ox, oy] = s.origin, step = s.tile_size;
    const grid = {cell: (x, y) => `${Math.round((x - ox) / step)},${Math.round((y - oy) / step)}`};
    describe(slide);
    const overlay = svg("image", {class: "p-overlay", href: slide.files.overlay, x: ox, y: oy, width: s.columns * step,
      height: s.rows * step, preserveAspectRatio: "none"});
    world.prepend(overlay);
    const frames = svg("g", {class: "frames"});
    const flagged = new Map();
    for (const tile of slide.flagged) {
      flagged.set(grid.cell(tile.x, tile.y), tile);
      frames.append(svg("rect", {class: tile.item ? "frame" : "frame no-item", x: tile.x, y: tile.y, width: tile.size,
        height: tile.size, "vector-effect": "non-scaling-stroke"}));
    }
    overlay.after(frames);

    const show = document.getElementById("show-overlay"), opacity = document.getElementById("overlay-opacity");
    function paint() {
      overlay.setAttribute("visibility", show.checked ? "visible" : "hidden");
      overlay.setAttribute("opacity", String(opacity.value / 100));
      view.dataset.overlay = show.checked ? "shown" : "hidden";
      view.dataset.opacity = String(opacity.value / 100);
    }
    show.addEventListener("change", paint);
    opacity.addEventListener("input", paint);
    paint();

    const answers = tileAnswers(slide.files.tiles, grid);
    viewer.addHandler("canvas-click", async event => {
      if (!event.quick) return;  // the end of a drag
      const p = image.viewerElementToImageCoordinates(event.position);
      const key = `${Math.floor((p.x - ox) / step)},${Math.floor((p.y - oy) / step)}`;
      const tile = flagged.get(key);
      if (tile && tile.item) { window.location.href = `/review?item=${tile.item}`; return; }
      const answer = (await answers).get(key);
      Station.status(answer ? `this tile: P(IDC) ${Station.p(answer.p)}, ${answer.idc ? "IDC" : "no IDC"}` +
        (tile ? ", needs review (not in the review queue)" : "") : "no tissue here: not classified");
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const id = document.body.dataset.slide;
    if (id) viewerPage(id); else listPage();
  });
})();

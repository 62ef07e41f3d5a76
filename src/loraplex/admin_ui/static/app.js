// The admin UI's behaviour, attached to server-rendered pages (they work without it, too):
// confirmations, copy buttons, live refresh from each page's .json twin, the upload progress.
"use strict";
(function () {
  const csrf = document.body.dataset.csrf || "";

  // -- forms -----------------------------------------------------------------------------
  document.addEventListener("submit", (ev) => {
    const message = ev.target.dataset && ev.target.dataset.confirm;
    if (message && !window.confirm(message)) ev.preventDefault();
  });
  document.querySelectorAll("select[data-autosubmit]").forEach((el) => {
    el.addEventListener("change", () => el.form.requestSubmit());
  });
  document.querySelectorAll("[data-copy]").forEach((button) => {
    button.addEventListener("click", () => {
      const text = document.getElementById(button.dataset.copy).textContent;
      if (navigator.clipboard) {
        navigator.clipboard.writeText(text).then(() => { button.textContent = "Copied"; });
      }
    });
  });

  // -- formatting (the same as the server's Jinja filters) -------------------------------
  function pick(obj, path) {
    return path.split(".").reduce((o, k) => (o === null || o === undefined ? undefined : o[k]), obj);
  }
  function duration(s) {
    if (s === null || s === undefined) return "—";
    s = Math.max(0, Math.floor(s));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }
  const none = (v) => v === null || v === undefined;
  const formats = {
    ms: (v) => (none(v) ? "—" : v.toFixed(1) + " ms"),
    int: (v) => (none(v) ? "—" : String(Math.round(v))),
    rate: (v) => (none(v) ? "—" : String(v)),
    pct: (v) => (none(v) ? "—" : Math.round(v * 100) + "%"),
    dur: duration,
  };
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- live pages ------------------------------------------------------------------------
  function updateFields(data) {
    document.querySelectorAll("[data-field]").forEach((node) => {
      const value = pick(data, node.dataset.field);
      const format = formats[node.dataset.format];
      node.textContent = format ? format(value) : none(value) ? "—" : String(value);
      if (node.dataset.badge) {
        const good = Boolean(pick(data, node.dataset.badge));
        node.classList.toggle("ok", good);
        node.classList.toggle("bad", !good);
      }
    });
  }
  function updateTables(data) {
    document.querySelectorAll("table[data-table]").forEach((table) => {
      const counts = pick(data, table.dataset.table) || {};
      const body = table.tBodies[0];
      body.replaceChildren();
      const keys = Object.keys(counts).sort();
      for (const key of keys) {
        const row = body.insertRow();
        row.append(el("td", "", key), el("td", "num", String(Math.round(counts[key]))));
      }
      if (!keys.length) {
        const cell = el("td", "muted", "none");
        cell.colSpan = 2;
        body.insertRow().append(cell);
      }
    });
  }
  function drawCharts(data) {
    document.querySelectorAll("canvas[data-series]").forEach((canvas) => {
      const keys = canvas.dataset.series.split(",");
      const labels = (canvas.dataset.labels || "").split(",");
      const xs = pick(data, canvas.dataset.x || "series.t") || [];
      const series = keys.map((k, i) => ({ label: labels[i] || k, values: pick(data, k) || [] }));
      window.LpxChart.draw(canvas, xs, series, {
        kind: canvas.dataset.kind || "lines",
        xunit: canvas.dataset.xunit || "s",
      });
    });
  }
  function slotItem(s, now) {
    const item = el("li", "slot");
    item.dataset.slot = s.slot;
    item.append(el("span", "slot-no", "slot " + s.slot));
    if (none(s.adapter_id)) {
      item.classList.add("empty");
      item.append(el("span", "slot-name muted", "empty"));
      return item;
    }
    item.dataset.adapter = s.name || "";
    item.classList.toggle("pinned", s.pinned);
    item.classList.toggle("loading", s.loading);
    const name = el("span", "slot-name", s.name || "#" + s.adapter_id);
    if (s.version) name.append(" ", el("small", "", "v" + s.version));
    const meta = el("span", "slot-meta");
    if (s.loading) meta.append(el("span", "badge warn", "loading"));
    if (s.pinned) meta.append(el("span", "badge pin", "pinned"));
    if (s.in_use) meta.append(el("span", "badge ok", s.in_use + " running"));
    if (!none(s.lru_rank)) meta.append(el("span", "badge", "LRU " + (s.lru_rank + 1)));
    const age = s.resident_since ? "resident " + duration(now - s.resident_since) : "";
    item.append(name, el("span", "slot-tenant muted", s.tenant_name || ""), meta,
      el("span", "slot-age muted", age));
    return item;
  }
  function updatePool(data) {
    const slots = document.getElementById("slots");
    if (slots) slots.replaceChildren(...data.slots.map((s) => slotItem(s, data.now)));
    const rates = document.getElementById("hit-rates");
    if (rates) {
      for (const [tier, r] of Object.entries(data.hit_rates)) {
        const row = rates.querySelector('tr[data-tier="' + tier + '"]');
        if (!row) continue;
        row.cells[1].textContent = r.hits;
        row.cells[2].textContent = r.misses;
        row.cells[3].textContent = formats.pct(r.rate);
      }
    }
  }
  const live = document.querySelector("[data-live]");
  if (live) {
    let latest = null;
    const apply = (data) => {
      latest = data;
      updateFields(data);
      updateTables(data);
      if (document.body.dataset.page === "pool") updatePool(data);
      drawCharts(data);
    };
    const tick = async () => {
      if (document.hidden) return;
      try {
        const response = await fetch(live.dataset.live, {
          headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin",
        });
        if (response.status === 401) {
          window.location.href = "/admin/login?next=" + encodeURIComponent(window.location.pathname);
          return;
        }
        if (response.ok) apply(await response.json());
      } catch (err) {
        // the server may be restarting; the next tick tries again
      }
    };
    tick();
    setInterval(tick, Number(live.dataset.every) || 3000);
    window.addEventListener("resize", () => { if (latest) drawCharts(latest); });
  }

  // -- upload with a progress bar ----------------------------------------------------------
  async function refreshAdapterTable() {
    const response = await fetch(window.location.href, { cache: "no-store", credentials: "same-origin" });
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.getElementById("adapter-table");
    const current = document.getElementById("adapter-table");
    if (fresh && current) current.replaceWith(document.importNode(fresh, true));
  }
  const upload = document.getElementById("upload");
  if (upload) {
    upload.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const bar = document.getElementById("upload-progress");
      const out = document.getElementById("upload-result");
      const button = upload.querySelector("button[type=submit]");
      const say = (text, kind) => { out.textContent = text; out.className = kind ? "flash " + kind : ""; };
      const limit = Number(upload.dataset.maxBytes);
      let total = 0;
      for (const input of upload.querySelectorAll("input[type=file]")) {
        for (const file of input.files) total += file.size;
      }
      if (limit && total > limit) {
        say("These files are " + total + " bytes, over the server's limit of " + limit + ".", "flash-error");
        return;
      }
      const xhr = new XMLHttpRequest();
      xhr.open("POST", upload.action);
      xhr.setRequestHeader("X-CSRF-Token", csrf);
      xhr.setRequestHeader("Accept", "application/json");
      bar.hidden = false;
      bar.value = 0;
      button.disabled = true;
      say("Uploading…");
      xhr.upload.addEventListener("progress", (e) => {
        if (!e.lengthComputable) return;
        bar.value = Math.round((100 * e.loaded) / e.total);
        say("Uploading… " + bar.value + "%");
      });
      xhr.upload.addEventListener("load", () => { bar.value = 100; say("Validating…"); });
      xhr.addEventListener("load", () => {
        button.disabled = false;
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (err) { body = {}; }
        if (xhr.status === 401) { window.location.reload(); return; }
        if (xhr.status === 201) say(body.message, "flash-ok");
        else say("Upload refused (" + xhr.status + "): " +
          (body.error ? body.error.message : xhr.statusText), "flash-error");
        refreshAdapterTable();
      });
      xhr.addEventListener("error", () => {
        button.disabled = false;
        say("The upload did not reach the server (network error or too large).", "flash-error");
      });
      xhr.send(new FormData(upload));
    });
  }
})();

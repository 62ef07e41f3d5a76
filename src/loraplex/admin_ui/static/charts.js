// Small canvas charts for the admin UI: lines (null values leave gaps) or grouped bars.
// Drawn by hand so that nothing is fetched from elsewhere and no build step is needed.
"use strict";
window.LpxChart = (function () {
  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // The axis top: four equal steps, each a round number (1, 2, 2.5 or 5 times a power of 10).
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const step = v / 4, p = Math.pow(10, Math.floor(Math.log10(step)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= step) return 4 * m * p;
    return 40 * p;
  }

  function fmt(v) {
    if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k";
    if (v >= 10 || v === 0) return String(Math.round(v));
    return v.toFixed(v >= 1 ? 1 : 2);
  }

  function xLabel(x, unit) {
    if (x === 0) return "now";
    return unit === "min" ? x + " min" : Math.round(x) + " s";
  }

  // xs: numbers; series: [{label, values}]; opts: {kind: "lines" | "bars", xunit: "s" | "min"}
  function draw(canvas, xs, series, opts) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const colors = [css("--c1"), css("--c2"), css("--c3"), css("--c4")];
    const muted = css("--muted"), grid = css("--line");
    ctx.font = "11px system-ui, sans-serif";
    const left = 42, right = 8, top = 20, bottom = 18;
    const pw = w - left - right, ph = h - top - bottom;
    let max = 0, any = false;
    for (const s of series) for (const v of s.values) {
      if (v !== null && v !== undefined) { any = true; if (v > max) max = v; }
    }
    max = niceMax(max);
    ctx.lineWidth = 1;
    ctx.strokeStyle = grid;
    ctx.fillStyle = muted;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = Math.round(top + ph - (ph * i) / 4) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w - right, y); ctx.stroke();
      ctx.fillText(fmt((max * i) / 4), left - 5, y);
    }
    const n = xs.length;
    ctx.textBaseline = "top";
    if (n) {
      ctx.textAlign = "left"; ctx.fillText(xLabel(xs[0], opts.xunit), left, top + ph + 4);
      ctx.textAlign = "right"; ctx.fillText(xLabel(xs[n - 1], opts.xunit), w - right, top + ph + 4);
    }
    const x0 = n ? xs[0] : 0, span = n > 1 ? xs[n - 1] - x0 : 1;
    const X = (x) => left + (pw * (x - x0)) / (span || 1);
    const Y = (v) => top + ph - (ph * v) / max;
    if (opts.kind === "bars") {
      const slot = pw / Math.max(n, 1), bw = Math.max(1, (slot * 0.8) / series.length);
      series.forEach((s, k) => {
        ctx.fillStyle = colors[k % colors.length];
        s.values.forEach((v, i) => {
          if (!v) return;
          const x = left + slot * i + slot * 0.1 + bw * k;
          ctx.fillRect(x, Y(v), bw, top + ph - Y(v));
        });
      });
    } else {
      series.forEach((s, k) => {
        ctx.strokeStyle = ctx.fillStyle = colors[k % colors.length];
        ctx.lineWidth = 2;
        ctx.beginPath();
        let open = false;
        s.values.forEach((v, i) => {
          if (v === null || v === undefined) { open = false; return; }
          const px = X(xs[i]), py = Y(v);
          const prev = s.values[i - 1], next = s.values[i + 1];
          if ((prev === null || prev === undefined) && (next === null || next === undefined)) {
            ctx.fillRect(px - 1.5, py - 1.5, 3, 3); // a lone point
          }
          if (open) ctx.lineTo(px, py); else ctx.moveTo(px, py);
          open = true;
        });
        ctx.stroke();
      });
    }
    let lx = left;
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    series.forEach((s, k) => {
      ctx.fillStyle = colors[k % colors.length];
      ctx.fillRect(lx, 4, 10, 10);
      ctx.fillStyle = muted;
      ctx.fillText(s.label, lx + 14, 3);
      lx += 26 + ctx.measureText(s.label).width;
    });
    if (!any) {
      ctx.textAlign = "center"; ctx.textBaseline = "middle";
      ctx.fillText("no data yet", left + pw / 2, top + ph / 2);
    }
  }

  return { draw };
})();

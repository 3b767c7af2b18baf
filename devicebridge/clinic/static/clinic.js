// devicebridge clinic console: draws the plots (uPlot) from JSON that the server put in
// the page (data-json attributes), and keeps them current when htmx swaps in fresh data. No inline scripts
// (the Content-Security-Policy forbids them); no data leaves the console.
"use strict";

(function () {
  const ZONE_COLOURS = ["#2f6fb3", "#d9822b", "#1f8a4c", "#8e44ad", "#c0392b", "#16a085",
                        "#7f8c8d", "#b7950b", "#34495e", "#e67e22", "#2980b9", "#27ae60", "#a93226"];
  const CHANNEL_COLOURS = { red: "#c0392b", near_infrared: "#7b3f00", blue: "#2f6fb3" };
  const charts = new Map();
  const DAY_S = 86400;
  const WEEK_S = 7 * DAY_S;
  const WEEKS_SHOWN = 12;

  function readJson(id) {
    const element = document.getElementById(id);
    return element ? JSON.parse(element.dataset.json) : null;
  }

  function width(element) { return Math.max(320, element.clientWidth || 800); }

  function weeksChart(element, sessions) {
    const rows = sessions.filter((s) => s.started_at && s.status !== "running")
      .map((s) => [Date.parse(s.started_at) / 1000, s.completion, s.in_band_fraction])
      .sort((a, b) => a[0] - b[0]);
    const data = [rows.map((r) => r[0]),
                  rows.map((r) => (r[1] == null ? null : r[1] * 100)),
                  rows.map((r) => (r[2] == null ? null : r[2] * 100))];
    // The last twelve weeks at least, up to today: one session is a point in its week.
    const now = Date.now() / 1000;
    const first = rows.length ? Math.min(rows[0][0], now - WEEKS_SHOWN * WEEK_S) : now - WEEKS_SHOWN * WEEK_S;
    const options = {
      width: width(element), height: 260,
      scales: { x: { time: true, range: [first, now + DAY_S] }, y: { range: [0, 105] } },
      axes: [{}, { label: "%" }],
      series: [{ label: "session" }, { label: "routine done", stroke: "#1f8a4c", points: { size: 7 }, paths: () => null },
               { label: "time in band", stroke: "#2f6fb3", points: { size: 7 }, paths: () => null }],
    };
    return { options, data };
  }

  function pressureChart(element, plot) {
    const series = [{ label: "t (s)" }];
    const data = [plot.t];
    plot.zones.forEach((zone, i) => {
      const colour = ZONE_COLOURS[i % ZONE_COLOURS.length];
      series.push({ label: zone, stroke: colour, width: 2, spanGaps: false });
      data.push(plot.mean[zone]);
      series.push({ label: zone + " max", stroke: colour, width: 1, dash: [2, 3], spanGaps: false });
      data.push(plot.peak[zone]);
      const band = plot.bands[zone];
      if (band) {
        series.push({ label: zone + " band", stroke: "#1f8a4c", width: 1, dash: [6, 4] });
        data.push(plot.mean[zone].map((v) => (v == null ? null : band[0])));
        series.push({ label: zone + " band top", stroke: "#1f8a4c", width: 1, dash: [6, 4] });
        data.push(plot.mean[zone].map((v) => (v == null ? null : band[1])));
      }
      const cap = plot.caps[zone];
      if (cap != null) {
        series.push({ label: zone + " cap", stroke: "#c53030", width: 1, dash: [3, 3] });
        data.push(plot.mean[zone].map((v) => (v == null ? null : cap)));
      }
    });
    return { options: { width: width(element), height: 340, series,
                        axes: [{ label: "s" }, { label: "kPa" }], scales: { x: { time: false } } }, data };
  }

  function channelChart(element, plot, key, unit) {
    const series = [{ label: "t (s)" }];
    const data = [plot.t];
    Object.keys(plot[key]).forEach((ch) => {
      series.push({ label: ch.replace("_", "-"), stroke: CHANNEL_COLOURS[ch] || "#333", width: 2 });
      data.push(plot[key][ch]);
      if (key === "dose" && plot.dose_caps[ch] != null && plot.dose[ch].some((v) => v > 0)) {
        series.push({ label: ch.replace("_", "-") + " cap", stroke: CHANNEL_COLOURS[ch], dash: [4, 4] });
        data.push(plot.t.map(() => plot.dose_caps[ch]));
      }
    });
    return { options: { width: width(element), height: 300, series,
                        axes: [{ label: "s" }, { label: unit }], scales: { x: { time: false } } }, data };
  }

  function temperatureChart(element, plot) {
    return { options: { width: width(element), height: 180,
                        series: [{ label: "t (s)" }, { label: "skin °C (max)", stroke: "#d9822b", width: 2 }],
                        axes: [{ label: "s" }, { label: "°C" }], scales: { x: { time: false } } },
             data: [plot.t, plot.temperature] };
  }

  function build(element) {
    const kind = element.dataset.chart;
    const source = readJson(element.dataset.source);
    if (source == null) return null;
    if (kind === "weeks") return weeksChart(element, source);
    if (kind === "pressure") return pressureChart(element, source);
    if (kind === "irradiance") return channelChart(element, source, "irradiance", "mW/cm²");
    if (kind === "dose") return channelChart(element, source, "dose", "J/cm²");
    if (kind === "temperature") return temperatureChart(element, source);
    return null;
  }

  function draw() {
    if (typeof uPlot === "undefined") return;
    document.querySelectorAll("[data-chart]").forEach((element) => {
      const built = build(element);
      if (!built) return;
      const signature = JSON.stringify(built.data);
      const existing = charts.get(element);
      if (existing && existing.signature === signature) return;
      if (existing) existing.plot.destroy();
      element.replaceChildren();
      const plot = new uPlot(built.options, built.data, element);
      charts.set(element, { plot, signature });
      element.dataset.points = String(built.data[0].length);
    });
  }

  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:afterSettle", draw);
})();

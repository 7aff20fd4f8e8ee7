// A task's page, live: per-epoch uPlot charts fed from the metrics API (only the new epochs are
// fetched, when the polled status fragment says there are more), and the log kept short and
// scrolled to its newest line. Without JavaScript the page still has the epochs table and log.
(function () {
  "use strict";

  var MAX_LOG_LINES = 200;
  var COLORS = { train: "#4f46e5", val: "#b45309", acc: "#15803d", qwk: "#0e7490", mem: "#7c3aed", budget: "#dc2626" };

  function series(label, color, extra) {
    var s = { label: label, stroke: color, width: 2, spanGaps: true, points: { show: true, size: 5 } };
    for (var k in extra || {}) s[k] = extra[k];
    return s;
  }

  function start() {
    var box = document.getElementById("task-charts");
    if (!box || typeof window.uPlot !== "function") return;
    var url = box.getAttribute("data-metrics-url");
    var budget = parseFloat(box.getAttribute("data-budget-mib") || "");
    var data = { epoch: [], train: [], val: [], acc: [], qwk: [], mem: [], budget: [] };
    var charts = null;
    var lastEpoch = -1;
    var loading = false;

    // Each chart fills its own cell of the charts' grid.
    function width(target) { return Math.max(260, Math.min(640, (target && target.clientWidth) || 300)); }

    function specs() {
      var memSeries = [{ label: "epoch" }, series("peak MiB", COLORS.mem)];
      var memData = [data.epoch, data.mem];
      if (!isNaN(budget)) {
        memSeries.push(series("budget MiB", COLORS.budget, { dash: [6, 4], points: { show: false } }));
        memData.push(data.budget);
      }
      return [
        { id: "chart-loss", series: [{ label: "epoch" }, series("train loss", COLORS.train), series("val loss", COLORS.val)],
          data: [data.epoch, data.train, data.val] },
        { id: "chart-scores", series: [{ label: "epoch" }, series("val accuracy", COLORS.acc), series("val QWK", COLORS.qwk)],
          data: [data.epoch, data.acc, data.qwk], range: [0, 1] },
        { id: "chart-memory", series: memSeries, data: memData, zero: true },
      ];
    }

    function draw() {
      var list = specs();
      if (!charts) {
        charts = list.map(function (spec) {
          var target = document.getElementById(spec.id);
          var yScale = spec.range ? { range: function (u, lo, hi) { return [Math.min(spec.range[0], lo), Math.max(spec.range[1], hi)]; } }
            : spec.zero ? { range: function (u, lo, hi) { return [0, hi > 0 ? hi * 1.1 : 1]; } } : {};
          return new window.uPlot({
            title: target.getAttribute("data-title"),
            width: width(target),
            height: 200,
            scales: { x: { time: false }, y: yScale },
            axes: [{ label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100] }, {}],
            series: spec.series,
          }, spec.data, target);
        });
      } else {
        charts.forEach(function (chart, i) { chart.setData(list[i].data); });
      }
      box.setAttribute("data-drawn-epochs", String(data.epoch.length));
    }

    function load() {
      if (loading) return;
      loading = true;
      fetch(url + "?after=" + lastEpoch, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : []; })
        .then(function (rows) {
          var added = 0;
          rows.forEach(function (m) {
            if (m.epoch <= lastEpoch) return; // never twice, even if two answers cross
            lastEpoch = m.epoch;
            data.epoch.push(m.epoch + 1);
            data.train.push(m.train_loss);
            data.val.push(m.val_loss);
            data.acc.push(m.val_accuracy);
            data.qwk.push(m.val_qwk);
            data.mem.push(m.peak_memory_bytes / 1048576);
            data.budget.push(isNaN(budget) ? null : budget);
            added += 1;
          });
          if (added) draw();
        })
        .catch(function () { /* the next poll tries again */ })
        .then(function () { loading = false; });
    }

    function trimLog() {
      var log = document.getElementById("event-log");
      if (!log) return;
      while (log.children.length > MAX_LOG_LINES) log.removeChild(log.firstElementChild);
      log.scrollTop = log.scrollHeight;
    }

    document.body.addEventListener("htmx:afterSettle", function () {
      var status = document.getElementById("task-status");
      var have = status ? parseInt(status.getAttribute("data-epochs") || "0", 10) : 0;
      if (have > lastEpoch + 1) load();
      trimLog();
    });
    window.addEventListener("resize", function () {
      if (charts) charts.forEach(function (chart) { chart.setSize({ width: width(chart.root.parentNode), height: 200 }); });
    });
    trimLog();
    load();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

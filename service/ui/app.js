// The job UI: plain JavaScript, no framework, no build step, nothing loaded from elsewhere.
//
// It reads the service's JSON API (../v1/...) with the bearer token typed into the login form.
// The token is kept in sessionStorage (this tab only) and sent in the Authorization header, never
// in a URL. Everything that comes from the API (job names, reasons, params) reaches the page as
// text nodes or attribute values, never as markup. Pages: #/ (jobs and sweeps), #/jobs/<id>,
// #/sweeps/<id>; a page polls every few seconds and stops once its job has ended.
"use strict";

const API = new URL("../v1/", document.baseURI);
const TOKEN_KEY = "topk.token";
const POLL_MS = 3000;
const LIST_POLL_MS = 5000;
const MAX_TRIAL_CURVES = 10;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATUSES = new Set(["queued", "launching", "running", "succeeded", "failed", "cancelled"]);
const SVG_NS = "http://www.w3.org/2000/svg";

// -- DOM: elements from tags, attributes and children; strings always become text nodes ------

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function el(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svg(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

// A page section under its title.
function titledSection(title, ...children) {
  return el("section", null, el("h2", null, title), ...children);
}

function $(id) {
  return document.getElementById(id);
}

// -- formatting ----------------------------------------------------------------------------------

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

// A loss or an accuracy.
function formatNumber(value) {
  if (!isNumber(value)) return "—";
  return Math.abs(value) < 10 ? value.toFixed(3) : value.toFixed(1);
}

function formatCount(value) {
  return isNumber(value) ? String(value) : "—";
}

function formatTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

function statusBadge(status) {
  const known = STATUSES.has(status) ? status : "unknown";
  return el("span", { class: `status status-${known}`, "data-status": status }, status);
}

function collectionOf(record) {
  return record.kind === "sweep" ? "sweeps" : "jobs";
}

function pageLink(record, ...children) {
  const href = `#/${collectionOf(record)}/${encodeURIComponent(record.id)}`;
  return el("a", { href }, ...children);
}

// Links that come from the API are only made clickable for http(s) URLs.
function safeHref(url) {
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

// -- the API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

class LoginNeeded extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new LoginNeeded("");
  const response = await fetch(new URL(path, API), {
    headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
    cache: "no-store",
    referrerPolicy: "no-referrer",
  });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw new LoginNeeded((body && body.message) || "the token was refused");
  }
  if (!response.ok) {
    const code = (body && body.error) || "http_error";
    throw new ApiError(response.status, code, (body && body.message) || `HTTP ${response.status}`);
  }
  return body;
}

function setBanner(text) {
  const banner = $("banner");
  banner.textContent = text || "";
  banner.hidden = !text;
}

// Runs `tick` now and then every `intervalMs` until it returns false, fails for good, or
// `stop()` is called. A hidden tab skips its ticks (and so sends no requests).
function poller(tick, intervalMs) {
  let stopped = false;
  let timer = null;
  async function run() {
    if (stopped) return;
    let again = true;
    if (!document.hidden) {
      try {
        again = await tick(() => stopped);
        setBanner(null);
      } catch (error) {
        again = !stopped && handleError(error);
      }
    }
    if (!stopped && again !== false) timer = setTimeout(run, intervalMs);
  }
  run();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

// Whether polling goes on after `error`.
function handleError(error) {
  if (error instanceof LoginNeeded) {
    showLogin(error.message);
    return false;
  }
  if (error instanceof ApiError && error.status === 404) {
    showNotFound(error);
    return false;
  }
  if (error instanceof ApiError) {
    setBanner(`The server answered ${error.status} (${error.code}): ${error.message}. Retrying.`);
    return true;
  }
  setBanner("Cannot reach the server. Retrying.");
  return true;
}

// -- pages ---------------------------------------------------------------------------------------

let current = { stop() {} };

function show(...nodes) {
  $("view").replaceChildren(...nodes.filter((node) => node !== null));
}

function showLogin(message) {
  current.stop();
  current = { stop() {} };
  $("login").hidden = false;
  $("logout").hidden = true;
  $("view").replaceChildren();
  const error = $("login-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("token").focus();
}

function showNotFound(error) {
  document.title = "Not found · topk";
  show(
    el(
      "div",
      { class: "not-found", "data-error": error.code },
      el("h1", null, "Not found"),
      el("p", { id: "not-found-message" }, error.message),
      el("p", null, el("a", { href: "#/" }, "All jobs and sweeps")),
    ),
  );
}

function route() {
  current.stop();
  current = { stop() {} };
  setBanner(null);
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    showLogin("");
    return;
  }
  $("login").hidden = true;
  $("logout").hidden = false;
  const match = location.hash.match(/^#\/(jobs|sweeps)\/([^/]+)$/);
  if (!match) {
    current = listPage();
    return;
  }
  let id;
  try {
    id = decodeURIComponent(match[2]);
  } catch {
    showNotFound(new ApiError(404, "not_found", "not a job id"));
    return;
  }
  current = match[1] === "jobs" ? jobPage(id) : sweepPage(id);
}

// The list: both collections, newest first. The list records carry no metrics, so each job's
// record is read once it is shown and again while it has not ended.
function listPage() {
  document.title = "Jobs · topk";
  show(el("h1", null, "Jobs and sweeps"), el("p", { class: "muted" }, "Loading…"));
  const records = new Map();
  let shown = "";
  return poller(async (stopped) => {
    const [jobs, sweeps] = await Promise.all([api("jobs?limit=50"), api("sweeps?limit=50")]);
    const items = [...jobs.items, ...sweeps.items].sort(
      (a, b) => Date.parse(b.created_at) - Date.parse(a.created_at),
    );
    await Promise.all(
      items
        .filter((item) => !(records.has(item.id) && TERMINAL.has(records.get(item.id).status)))
        .map(async (item) => {
          try {
            records.set(item.id, await api(`${collectionOf(item)}/${encodeURIComponent(item.id)}`));
          } catch (error) {
            if (!(error instanceof ApiError)) throw error;
          }
        }),
    );
    if (stopped()) return false;
    const rows = items.map((item) => records.get(item.id) || item);
    const key = JSON.stringify(rows);
    if (key !== shown) {
      shown = key;
      show(el("h1", null, "Jobs and sweeps"), jobsTable(rows));
    }
    return true;
  }, LIST_POLL_MS);
}

function jobsTable(rows) {
  if (rows.length === 0) {
    return el(
      "p",
      { class: "muted" },
      "No jobs yet. Submit one with ",
      el("code", null, "topk submit SPEC"),
      " or POST /v1/jobs.",
    );
  }
  const columns = ["Job", "Kind", "Status", "Epoch", "Loss", "Best metric", "Submitted"];
  return gridTable(
    "jobs",
    columns,
    rows.map((record) => {
      const summary = summarize(record);
      return el(
        "tr",
        { "data-id": record.id },
        el(
          "td",
          null,
          pageLink(record, record.name || record.id),
          el("div", { class: "muted small" }, record.id),
        ),
        el("td", null, record.kind === "sweep" ? "sweep" : "train"),
        el(
          "td",
          null,
          statusBadge(record.status),
          record.status_reason
            ? el(
                "div",
                { class: "muted small reason", title: record.status_reason },
                record.status_reason,
              )
            : null,
        ),
        el("td", { class: "num" }, formatCount(summary.epoch)),
        el("td", { class: "num", "data-field": "loss" }, formatNumber(summary.loss)),
        el("td", { "data-field": "best" }, summary.best),
        el("td", null, formatTime(record.created_at)),
      );
    }),
  );
}

// A table of class "grid" with this id: a header row of column names, then `rows` (tr elements).
function gridTable(id, columns, rows) {
  const head = el("tr", null, columns.map((name) => el("th", { scope: "col" }, name)));
  return el("table", { id, class: "grid" }, el("thead", null, head), el("tbody", null, rows));
}

// Epoch, training loss and the best metric of a job or a sweep record (a sweep: its best trial).
function summarize(record) {
  const spec = record.spec || {};
  if (record.kind === "sweep") {
    const best = bestTrial(record);
    if (!best) return { epoch: null, loss: null, best: "—" };
    const metrics = best.metrics || {};
    const metric = sweepMetric(record);
    return {
      epoch: metrics.epoch,
      loss: metrics.train_loss,
      best: `${metric} ${formatNumber(metrics[metric])} (trial ${best.trial_id})`,
    };
  }
  const latest = record.latest_metrics || {};
  const select = (spec.metrics && spec.metrics.select) || "val_top5";
  const result = record.result || {};
  if (result.best && isNumber(result.best[select])) {
    const epoch = result.best_epoch ? ` (epoch ${result.best_epoch})` : "";
    return {
      epoch: latest.epoch,
      loss: latest.train_loss,
      best: `${select} ${formatNumber(result.best[select])}${epoch}`,
    };
  }
  return {
    epoch: latest.epoch,
    loss: latest.train_loss,
    best: isNumber(latest[select]) ? `${select} ${formatNumber(latest[select])} (latest)` : "—",
  };
}

function sweepMetric(record) {
  return (record.spec && record.spec.metric) || "val_top5";
}

function bestTrial(record) {
  const metric = sweepMetric(record);
  const sign = record.spec && record.spec.mode === "min" ? -1 : 1;
  let best = null;
  for (const trial of record.trials || []) {
    const value = trial && trial.metrics && trial.metrics[metric];
    if (!isNumber(value)) continue;
    if (best === null || sign * value > sign * best.metrics[metric]) best = trial;
  }
  return best;
}

function jobPage(id) {
  return recordPage(
    "jobs",
    id,
    async (record) => {
      const history = await api(`jobs/${encodeURIComponent(id)}/metrics`);
      return [record, history.epochs];
    },
    renderJob,
  );
}

function sweepPage(id) {
  const trialCurves = new Map();
  const finalCurves = new Set(); // read after the sweep ended: they will not change
  return recordPage(
    "sweeps",
    id,
    async (record) => {
      // The trial table (sweep.json) grows while the sweep runs: a trial's history is read
      // again on every poll, and once more after the sweep has ended; then it is kept.
      const shown = rankedTrials(record).slice(0, MAX_TRIAL_CURVES);
      const ended = TERMINAL.has(record.status);
      await Promise.all(
        shown
          .filter((trial) => !(ended && finalCurves.has(trial.trial_id)))
          .map(async (trial) => {
            const trialId = encodeURIComponent(trial.trial_id);
            const path = `sweeps/${encodeURIComponent(id)}/trials/${trialId}/metrics`;
            try {
              trialCurves.set(trial.trial_id, (await api(path)).epochs);
              if (ended) finalCurves.add(trial.trial_id);
            } catch (error) {
              if (!(error instanceof ApiError)) throw error; // drawn without it
            }
          }),
      );
      return [record, shown.map((trial) => [trial, trialCurves.get(trial.trial_id) || []])];
    },
    renderSweep,
  );
}

// A job's or a sweep's page: read the record (and what `load` adds), draw it when it changed,
// poll until the job has ended.
function recordPage(collection, id, load, render) {
  show(el("p", { class: "muted" }, "Loading…"));
  let shown = "";
  return poller(async (stopped) => {
    const record = await api(`${collection}/${encodeURIComponent(id)}`);
    const data = await load(record);
    if (stopped()) return false;
    const key = JSON.stringify(data);
    if (key !== shown) {
      shown = key;
      document.title = `${record.name || record.id} · topk`;
      show(...render(...data));
    }
    return !TERMINAL.has(record.status);
  }, POLL_MS);
}

function header(record) {
  const live = TERMINAL.has(record.status)
    ? el("span", { id: "live", "data-live": "false", class: "muted" }, "final")
    : el(
        "span",
        { id: "live", "data-live": "true", class: "live" },
        `updating every ${POLL_MS / 1000} s`,
      );
  const dashboard = safeHref(record.dashboard_url);
  const facts = [
    [
      "Status",
      el(
        "span",
        { id: "status", "data-status": record.status },
        statusBadge(record.status),
        " ",
        live,
      ),
    ],
    ["Reason", record.status_reason || "—"],
    ...(record.warnings || []).map((warning) => [
      "Warning",
      el("span", { class: "warning", "data-warning": "collapse" }, warning),
    ]),
    ["Owner", record.owner],
    ["Attempts", String(record.attempts)],
    ["Submitted", formatTime(record.created_at)],
    ["Started", formatTime(record.started_at)],
    ["Finished", formatTime(record.finished_at)],
    [
      "Ray dashboard",
      dashboard
        ? el(
            "a",
            { id: "dashboard", href: dashboard, target: "_blank", rel: "noopener noreferrer" },
            record.submission_id || "open",
          )
        : el("span", { class: "muted" }, "not launched yet"),
    ],
    ["Run folder", el("code", null, record.storage)],
  ];
  return [
    el("p", { class: "crumbs" }, el("a", { href: "#/" }, "← All jobs and sweeps")),
    el("h1", null, record.name || record.id, " ", el("span", { class: "muted small" }, record.id)),
    el(
      "dl",
      { class: "facts" },
      facts.map(([name, value]) => [el("dt", null, name), el("dd", null, value)]),
    ),
  ];
}

function eventsSection(record) {
  const events = record.events || [];
  return titledSection(
    "Status history",
    el(
      "ol",
      { id: "events", class: "events" },
      events.map((event) =>
        el(
          "li",
          { "data-status": event.to_status },
          el("time", { datetime: event.at }, formatTime(event.at)),
          " ",
          event.from_status ? [statusBadge(event.from_status), " → "] : null,
          statusBadge(event.to_status),
          event.reason ? el("span", { class: "reason" }, event.reason) : null,
        ),
      ),
    ),
  );
}

// The K of "top-K" on this job's charts: the largest of the spec's metrics.ks.
function topK(trainSpec) {
  const ks = (trainSpec && trainSpec.metrics && trainSpec.metrics.ks) || [1, 5];
  return Math.max(...ks.filter(Number.isInteger), 1);
}

// One line of a chart: `metric` per epoch; `key` names it in the SVG (data-series).
function seriesOf(epochs, metric, label, key = metric) {
  const points = epochs
    .filter((epoch) => isNumber(epoch.epoch) && isNumber(epoch[metric]))
    .map((epoch) => [epoch.epoch, epoch[metric]]);
  return { key, label, points };
}

function renderJob(record, epochs) {
  const k = topK(record.spec);
  const accuracy = [seriesOf(epochs, "val_top1", "validation top-1")];
  if (k > 1) {
    accuracy.push(seriesOf(epochs, `val_top${k}`, `validation top-${k}`));
  }
  accuracy.push(seriesOf(epochs, `val_macro_top${k}`, `validation macro top-${k}`));
  const curves = titledSection("Curves per epoch");
  if (epochs.length === 0) {
    curves.append(el("p", { class: "muted" }, "No epoch has finished yet."));
  } else {
    curves.append(
      el(
        "div",
        { class: "charts" },
        lineChart({
          id: "loss",
          title: "Training loss",
          series: [seriesOf(epochs, "train_loss", "train loss")],
        }),
        lineChart({
          id: "accuracy",
          title: "Validation accuracy",
          series: accuracy,
          yDomain: [0, 1],
        }),
      ),
    );
  }
  const result =
    record.result && record.result.error
      ? titledSection("Error", el("pre", { class: "error" }, record.result.error))
      : null;
  return [...header(record), curves, result, eventsSection(record)];
}

function rankedTrials(record) {
  const metric = sweepMetric(record);
  const sign = record.spec && record.spec.mode === "min" ? 1 : -1;
  const value = (trial) =>
    trial.metrics && isNumber(trial.metrics[metric]) ? trial.metrics[metric] : null;
  return [...(record.trials || [])]
    .filter((trial) => trial && typeof trial.trial_id === "string")
    .sort((a, b) => {
      if (value(a) === null) return value(b) === null ? 0 : 1;
      if (value(b) === null) return -1;
      return sign * (value(a) - value(b));
    });
}

function renderSweep(record, curves) {
  const metric = sweepMetric(record);
  const trials = record.trials || [];
  const best = bestTrial(record);
  const paths = [
    ...new Set(trials.flatMap((trial) => Object.keys((trial && trial.params) || {}))),
  ].sort();
  const table = trials.length
    ? gridTable(
        "trials",
        ["Trial", "Status", ...paths, metric, "Train loss", "Epochs"],
        trials.map((trial) => {
          const metrics = trial.metrics || {};
          const isBest = best !== null && trial === best;
          return el(
            "tr",
            { "data-trial": trial.trial_id, class: isBest ? "best" : null },
            el(
              "td",
              null,
              String(trial.trial_id),
              isBest ? el("span", { class: "tag" }, "best") : null,
            ),
            el(
              "td",
              null,
              String(trial.status || "—"),
              trial.error ? el("div", { class: "error small" }, trial.error) : null,
            ),
            paths.map((path) =>
              el("td", { class: "num" }, formatParam((trial.params || {})[path])),
            ),
            el("td", { class: "num" }, formatNumber(metrics[metric])),
            el("td", { class: "num" }, formatNumber(metrics.train_loss)),
            el("td", { class: "num" }, formatCount(metrics.epoch)),
          );
        }),
      )
    : el(
        "p",
        { class: "muted" },
        TERMINAL.has(record.status)
          ? "This sweep wrote no trial table."
          : "The trial table appears when the first trial starts.",
      );
  const sections = [...header(record), titledSection("Trials", table)];
  if (record.best_params) {
    sections.push(
      titledSection(
        "Best parameters",
        el(
          "dl",
          { id: "best-params", class: "facts" },
          Object.entries(record.best_params).map(([path, value]) => [
            el("dt", null, el("code", null, path)),
            el("dd", null, formatParam(value)),
          ]),
        ),
        record.best_config
          ? el(
              "details",
              null,
              el("summary", null, "Best config (a training spec: submit it with topk submit)"),
              el("pre", null, JSON.stringify(record.best_config, null, 2)),
            )
          : null,
      ),
    );
  }
  if (curves.length) {
    const note =
      trials.length > curves.length ? ` (the ${curves.length} best of ${trials.length})` : "";
    sections.push(
      titledSection(
        `Trial curves${note}`,
        el(
          "div",
          { class: "charts" },
          lineChart({
            id: "trial-metric",
            title: `${metric} per epoch, by trial`,
            series: curves.map(([trial, epochs]) =>
              seriesOf(epochs, metric, trial.trial_id, trial.trial_id),
            ),
          }),
          lineChart({
            id: "trial-loss",
            title: "Training loss per epoch, by trial",
            series: curves.map(([trial, epochs]) =>
              seriesOf(epochs, "train_loss", trial.trial_id, trial.trial_id),
            ),
          }),
        ),
      ),
    );
  }
  sections.push(eventsSection(record));
  return sections;
}

function formatParam(value) {
  if (value === undefined) return "—";
  return isNumber(value) ? String(value) : JSON.stringify(value);
}

// -- charts: inline SVG, one <circle data-series data-epoch> per point ---------------------------

function lineChart({ id, title, series, yDomain }) {
  const width = 560;
  const height = 260;
  const margin = { top: 14, right: 18, bottom: 40, left: 56 };
  const plotted = series.filter((one) => one.points.length > 0);
  const points = plotted.flatMap((one) => one.points);
  const figure = el("figure", { class: "chart", "data-chart": id }, el("figcaption", null, title));
  if (points.length === 0) {
    figure.append(el("p", { class: "muted" }, "Nothing reported yet."));
    return figure;
  }
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  let [y0, y1] = yDomain || [
    Math.min(...points.map((p) => p[1])),
    Math.max(...points.map((p) => p[1])),
  ];
  if (!yDomain) {
    const pad = y1 > y0 ? (y1 - y0) * 0.08 : Math.abs(y0) * 0.1 || 1;
    [y0, y1] = [y0 - pad, y1 + pad];
  }
  const innerW = width - margin.left - margin.right;
  const innerH = height - margin.top - margin.bottom;
  const x = (value) => margin.left + ((value - x0) / (x1 - x0)) * innerW;
  const y = (value) => margin.top + innerH - ((value - y0) / (y1 - y0)) * innerH;
  const round = (value) => Math.round(value * 10) / 10;

  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": title,
    class: "plot",
  });
  const ticks = niceTicks(y0, y1);
  for (const value of ticks.values) {
    chart.append(
      svg("line", {
        class: "grid-line",
        x1: margin.left,
        x2: width - margin.right,
        y1: round(y(value)),
        y2: round(y(value)),
      }),
      svg(
        "text",
        { class: "tick", x: margin.left - 6, y: round(y(value)) + 4, "text-anchor": "end" },
        value.toFixed(ticks.decimals),
      ),
    );
  }
  const epochs = [...new Set(points.map((p) => p[0]))].sort((a, b) => a - b);
  const step = Math.max(1, Math.ceil(epochs.length / 10));
  epochs
    .filter((_, index) => index % step === 0)
    .forEach((epoch) => {
      chart.append(
        svg(
          "text",
          {
            class: "tick",
            x: round(x(epoch)),
            y: height - margin.bottom + 16,
            "text-anchor": "middle",
          },
          String(epoch),
        ),
      );
    });
  chart.append(
    svg("line", {
      class: "axis",
      x1: margin.left,
      x2: width - margin.right,
      y1: height - margin.bottom,
      y2: height - margin.bottom,
    }),
    svg("line", {
      class: "axis",
      x1: margin.left,
      x2: margin.left,
      y1: margin.top,
      y2: height - margin.bottom,
    }),
    svg(
      "text",
      { class: "axis-label", x: margin.left + innerW / 2, y: height - 6, "text-anchor": "middle" },
      "epoch",
    ),
  );
  plotted.forEach((one, index) => {
    const colour = `series-${index % 8}`;
    const sorted = [...one.points].sort((a, b) => a[0] - b[0]);
    chart.append(
      svg("polyline", {
        class: `line ${colour}`,
        points: sorted.map(([e, v]) => `${round(x(e))},${round(y(v))}`).join(" "),
      }),
    );
    for (const [epoch, value] of sorted) {
      chart.append(
        svg(
          "circle",
          {
            class: `point ${colour}`,
            cx: round(x(epoch)),
            cy: round(y(value)),
            r: 3.5,
            "data-series": one.key,
            "data-epoch": epoch,
            "data-value": value,
          },
          svg("title", null, `${one.label}, epoch ${epoch}: ${formatNumber(value)}`),
        ),
      );
    }
  });
  figure.append(
    chart,
    el(
      "ul",
      { class: "legend" },
      plotted.map((one, index) =>
        el("li", null, el("span", { class: `swatch series-${index % 8}` }), one.label),
      ),
    ),
  );
  return figure;
}

// About `count` round values (steps of 1, 2 or 5 times a power of ten) between lo and hi.
function niceTicks(lo, hi, count = 5) {
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((candidate) => candidate >= raw);
  const values = [];
  for (let value = Math.ceil(lo / step) * step; value <= hi + step * 1e-9; value += step) {
    values.push(Math.abs(value) < step * 1e-9 ? 0 : value);
  }
  return { values, decimals: Math.max(0, -Math.floor(Math.log10(step))) };
}

// -- start ---------------------------------------------------------------------------------------

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("token");
  const token = input.value.trim();
  input.value = "";
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("jobs?limit=1");
  } catch (error) {
    if (error instanceof LoginNeeded) {
      showLogin(`Log-in refused: ${error.message}`);
      return;
    }
  }
  route();
});

$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  route();
});

window.addEventListener("hashchange", route);
route();

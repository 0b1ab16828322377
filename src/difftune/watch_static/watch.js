// difftune watch: polls the server's JSON endpoints and updates the page in place.
// Text from a run (prompts, paths, config) is set with textContent only, never as HTML:
// a run folder may come from anywhere.
"use strict";

const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
const state = { runs: [], pollMs: 2000, charts: {}, imageRun: 0, shownImages: "" };

function el(tag, attributes, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

async function getJSON(url) {
  const answer = await fetch(url, { cache: "no-store" });
  if (!answer.ok) throw new Error(`${url}: HTTP ${answer.status}`);
  return answer.json();
}

function colour(index, alpha) {
  const hex = COLOURS[index % COLOURS.length];
  if (alpha === undefined) return hex;
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  return `rgba(${r},${g},${b},${alpha})`;
}

// --- polling ---------------------------------------------------------------------------

async function start() {
  const info = await getJSON("/api/runs");
  state.pollMs = info.poll_ms || 2000;
  state.runs = info.runs.map((run) => ({
    ...run, total: 0, rows: new Map(), metrics: new Map(), floor: {}, facts: null,
    validation: { steps: [], floor: null }, card: null,
  }));
  buildRunCards();
  buildImageControls();
  poll();
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const changed = await Promise.all(state.runs.map(pollRun));
    if (changed.some(Boolean) || !Object.keys(state.charts).length) drawCharts();
    for (const run of state.runs) showFacts(run);
    showImages();
    status.textContent = `updated ${new Date().toLocaleTimeString()}; every ${state.pollMs / 1000} s`;
    status.className = "";
  } catch (error) {
    // The server stopped, or the run folder is being rewritten: keep what is shown, try again.
    status.textContent = `cannot update (${error.message}); trying again`;
    status.className = "problem";
  }
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  setTimeout(poll, state.pollMs);
}

// Only the events after the ones already here are asked for; true when a curve changed.
async function pollRun(run) {
  const base = `/api/run/${run.index}`;
  const [news, facts, validation] = await Promise.all([
    getJSON(`${base}/events?since=${run.total}`), getJSON(`${base}/facts`), getJSON(`${base}/validation`),
  ]);
  if (news.reset) {  // the log was replaced (a new run in the folder, a resync): start over
    run.rows = new Map(); run.metrics = new Map(); run.floor = {};
  }
  // By step: a resumed run logs the steps after its checkpoint again, and those replace.
  for (const row of news.rows) run.rows.set(row.step, row);
  let metricsChanged = false;
  for (const event of news.events) {
    if (event.event !== "validation" || !event.metrics) continue;
    for (const [name, value] of Object.entries(event.metrics)) {
      if (!run.metrics.has(name)) run.metrics.set(name, new Map());
      run.metrics.get(name).set(event.step, value);
    }
    if (event.floor) run.floor = event.floor;
    metricsChanged = true;
  }
  run.total = news.total;
  run.facts = facts;
  run.validation = validation;
  return news.reset || news.rows.length > 0 || metricsChanged;
}

// --- the runs' facts -------------------------------------------------------------------

function buildRunCards() {
  const holder = document.getElementById("runs");
  for (const run of state.runs) {
    const card = el("section", { class: "run", "data-run": run.index });
    card.style.borderLeftColor = colour(run.index);
    card.append(el("h3", {}, run.name), el("div", { class: "path" }, run.path), el("div", { class: "state" }),
                el("ul", { class: "facts" }));
    const details = el("details");
    details.append(el("summary", {}, "config.toml"), el("pre", { class: "config" }));
    card.append(details);
    holder.append(card);
    run.card = card;
  }
}

function showFacts(run) {
  const facts = run.facts;
  if (!facts || !run.card) return;
  const card = run.card;
  card.dataset.latestStep = facts.latest_step === null ? "" : String(facts.latest_step);
  card.querySelector(".state").textContent = facts.state;
  const lines = [...facts.facts];
  if (facts.data_check) lines.push(facts.data_check);
  lines.push(facts.checkpoints.length ? `checkpoints/: ${facts.checkpoints.join(", ")}` : "checkpoints/: none yet");
  lines.push(facts.final ? "final/: written" : "final/: not yet");
  if (facts.kept_finals.length) lines.push(`kept earlier results: ${facts.kept_finals.join(", ")}`);
  const list = card.querySelector(".facts");
  list.replaceChildren(...lines.map((line) => el("li", {}, line)));
  const config = card.querySelector(".config");
  const text = facts.config === null ? "(no config.toml)" : facts.config;
  if (config.textContent !== text) config.textContent = text;
  if (run.index === 0) document.body.dataset.latestStep = card.dataset.latestStep;
}

// --- charts ----------------------------------------------------------------------------

// Each chart: its series as {label, points: Map(step -> value), stroke, width, dash}.
function chartSeries() {
  const several = state.runs.length > 1;
  const named = (run, what) => (several ? `${run.name}: ${what}` : what);
  const loss = [], lr = [], throughput = [], metrics = [];
  for (const run of state.runs) {
    const rows = [...run.rows.values()];
    const pick = (key) => new Map(rows.map((row) => [row.step, row[key]]));
    loss.push({ label: named(run, "loss"), points: pick("loss"), stroke: colour(run.index, 0.3), width: 1 });
    loss.push({ label: named(run, "loss, mean of 10"), points: pick("smoothed"), stroke: colour(run.index), width: 2 });
    lr.push({ label: named(run, "learning rate"), points: pick("lr"), stroke: colour(run.index), width: 2 });
    throughput.push({ label: named(run, "samples/s"), points: pick("samples_per_s"), stroke: colour(run.index),
                      width: 2 });
    let number = 0;
    for (const [name, points] of run.metrics) {
      // Each metric its own colour with one run; with several, each run's colour, metrics told by dash.
      const index = several ? run.index : number;
      const dash = several && number > 0 ? [2, 3] : undefined;
      metrics.push({ label: named(run, name), points, stroke: colour(index), width: 2, dash });
      if (name in run.floor && run.floor[name] !== null) {
        const steps = [0, ...points.keys()];
        metrics.push({ label: named(run, `floor ${name} (control off)`), stroke: colour(index, 0.7), width: 1.5,
                       dash: [8, 5], points: new Map(steps.map((step) => [step, run.floor[name]])) });
      }
      number += 1;
    }
  }
  return [
    { id: "chart-loss", title: "training loss (raw and smoothed)", y: "loss", series: loss },
    { id: "chart-lr", title: "learning rate", y: "lr", series: lr },
    { id: "chart-throughput", title: "throughput", y: "samples/s", series: throughput },
    { id: "chart-metrics", title: "validation metrics (dashed: floor, control off)", y: "score", series: metrics,
      empty: "no validation metric yet (validation.metric)" },
  ];
}

// Steps are whole numbers: ticks 1, 2, 5 (or 2.5) times a power of ten apart, never 0.5.
const STEP_TICKS = [1, 2, 5].concat(...[1, 2, 3, 4, 5, 6, 7].map((power) => [1, 2, 2.5, 5].map((m) => m * 10 ** power)));

// Three significant digits, and an exponent for the very small or large (a learning rate
// of 1e-5 is not "0"); "--" for no value.
function shortNumber(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "--";
  const size = Math.abs(value);
  if (size !== 0 && (size < 1e-3 || size >= 1e6)) return value.toExponential(2).replace(/\.?0+e/, "e");
  return String(Number(value.toPrecision(3)));
}

// The series on one shared, sorted x (the steps of every run); null where a series has no
// value there, bridged by spanGaps so each run draws one line.
function aligned(series) {
  const steps = new Set();
  for (const one of series) for (const step of one.points.keys()) steps.add(step);
  const xs = [...steps].sort((a, b) => a - b);
  return [xs, ...series.map((one) => xs.map((x) => (one.points.has(x) ? one.points.get(x) : null)))];
}

function drawCharts() {
  for (const chart of chartSeries()) {
    const holder = document.getElementById(chart.id);
    const data = aligned(chart.series);
    // What the canvas shows, said where a test (or a curious reader) can see it.
    holder.dataset.points = String(data[0].length);
    holder.dataset.lastStep = data[0].length ? String(data[0][data[0].length - 1]) : "";
    if (!data[0].length) {
      if (state.charts[chart.id]) state.charts[chart.id].plot.destroy();
      delete state.charts[chart.id];
      holder.replaceChildren(el("div", { class: "empty" }, `${chart.title}: ${chart.empty || "no step events yet"}`));
      continue;
    }
    const shape = chart.series.map((one) => one.label).join("\n");
    const kept = state.charts[chart.id];
    if (kept && kept.shape === shape) {  // same series: new data in place, no flicker
      kept.plot.setData(data);
      continue;
    }
    if (kept) kept.plot.destroy();
    holder.replaceChildren();
    const options = {
      title: chart.title,
      width: Math.max(320, holder.clientWidth - 12),
      height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "step", incrs: STEP_TICKS },
             { label: chart.y, size: 64, values: (plot, ticks) => ticks.map(shortNumber) }],
      series: [{ label: "step" }, ...chart.series.map((one) => ({
        label: one.label, stroke: one.stroke, width: one.width, dash: one.dash, spanGaps: true,
        value: (plot, value) => shortNumber(value),
      }))],
    };
    state.charts[chart.id] = { plot: new uPlot(options, data, holder), shape };
  }
}

let resizing = null;
window.addEventListener("resize", () => {
  clearTimeout(resizing);
  resizing = setTimeout(() => {
    for (const [id, chart] of Object.entries(state.charts)) {
      const holder = document.getElementById(id);
      chart.plot.setSize({ width: Math.max(320, holder.clientWidth - 12), height: 260 });
    }
  }, 200);
});

// --- validation images -----------------------------------------------------------------

function buildImageControls() {
  const select = document.getElementById("image-run");
  for (const run of state.runs) select.append(el("option", { value: run.index }, run.name));
  // One run: nothing to choose.
  document.getElementById("image-run-label").classList.toggle("hidden", state.runs.length < 2);
  select.addEventListener("change", () => {
    state.imageRun = Number(select.value);
    document.getElementById("follow").checked = true;
    showImages();
  });
  const slider = document.getElementById("step-slider");
  slider.addEventListener("input", () => {
    // Moved to the newest: follow new validations again; moved back: stay there.
    document.getElementById("follow").checked = Number(slider.value) === Number(slider.max);
    showImages();
  });
  document.getElementById("follow").addEventListener("change", showImages);
}

function showImages() {
  const run = state.runs[state.imageRun];
  if (!run) return;
  const steps = run.validation.steps;
  const slider = document.getElementById("step-slider");
  const follow = document.getElementById("follow").checked;
  slider.max = String(Math.max(0, steps.length - 1));
  slider.disabled = steps.length < 2;
  if (follow || Number(slider.value) > steps.length - 1) slider.value = slider.max;
  const shown = steps[Number(slider.value)];
  const holder = document.getElementById("images");
  const key = JSON.stringify([run.index, shown || null, steps.length, run.validation.floor]);
  if (key === state.shownImages) return;  // nothing new: leave the images as they are
  state.shownImages = key;
  const label = document.getElementById("step-label");
  if (!shown) {
    label.textContent = "no validation yet";
    holder.replaceChildren();
  } else {
    label.textContent = `step ${shown.step ?? shown.name} (${Number(slider.value) + 1} of ${steps.length})`;
    holder.dataset.step = shown.step ?? "";
    const figures = shown.grids.map((grid) => figure(grid.url, grid.prompt || "(no prompt)", shown.step));
    if (shown.metric_grid) {
      figures.push(figure(shown.metric_grid, "held-out metric set: conditionings above, generated below",
                          shown.step));
    }
    holder.replaceChildren(...figures);
  }
  const floor = run.validation.floor;
  document.getElementById("floor-title").classList.toggle("hidden", !floor);
  document.getElementById("floor").replaceChildren(...(floor ? [figure(floor, "held-out metric set, control off")] : []));
}

function figure(url, caption, step) {
  const box = el("figure");
  const image = el("img", { src: url, alt: caption });
  if (step !== undefined && step !== null) image.dataset.step = String(step);
  box.append(image, el("figcaption", {}, caption));
  return box;
}

start().catch((error) => {
  const status = document.getElementById("status");
  status.textContent = `cannot start: ${error.message}`;
  status.className = "problem";
});

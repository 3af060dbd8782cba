// fedscan node, studies page: studies -> series -> slices from /api/studies, filters,
// pagination, a larger slice viewer and labels per series or per slice. Plain JS, no build.
(function () {
  "use strict";

  const params = new URLSearchParams(window.location.search);
  const token = params.get("token");
  const authHeaders = token ? { Authorization: "Bearer " + token } : {};
  const withToken = (url) =>
    token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;

  const FILTERS = ["q", "verdict", "status", "date_from", "date_to", "limit"];
  const $ = (id) => document.getElementById(id);
  const studiesEl = $("studies");
  const pagerEl = $("pager");
  const statusLine = $("status-line");
  const whoInput = $("who");

  const state = {
    offset: Number.parseInt(params.get("offset") || "0", 10) || 0,
    lastJson: "",
    expanded: new Set(), // series UIDs whose full slice list is shown
    fullSlices: new Map(), // series UID -> slices from /api/series/{uid}
    viewer: null, // { slices, index, series, study }
    flash: new Map(), // series UID -> the outcome of its last label action (survives re-render)
  };

  // -- small helpers ------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(el.dataset, value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  async function api(url, options) {
    const init = Object.assign({}, options || {});
    init.headers = Object.assign({}, authHeaders, init.headers || {});
    const response = await fetch(url, init);
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = { error: "HTTP " + response.status };
    }
    if (!response.ok) throw new Error((body && body.error) || "HTTP " + response.status);
    return body;
  }

  const pad = (n) => String(n).padStart(2, "0");
  function fmtEpoch(s) {
    if (s === null || s === undefined) return "";
    const d = new Date(Number(s) * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }
  // Today's times as HH:MM, older ones with their date.
  function fmtWhen(s) {
    const full = fmtEpoch(s);
    return full && full.slice(0, 10) === fmtEpoch(Date.now() / 1000).slice(0, 10) ? full.slice(11) : full;
  }
  function fmtDa(da) {
    return da && /^\d{8}$/.test(da) ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6, 8)}` : da || "";
  }
  function fmtTm(tm) {
    return tm && /^\d{4}/.test(tm) ? `${tm.slice(0, 2)}:${tm.slice(2, 4)}` : "";
  }
  function fmtName(pn) {
    if (!pn) return "(no name)";
    const parts = String(pn).split("=")[0].split("^"); // alphabetic group of a PN
    const family = parts[0] || "";
    const given = parts.slice(1, 3).filter(Boolean).join(" ");
    return given ? `${family}, ${given}` : family;
  }
  const fmtP = (p) => (p === null || p === undefined ? "n/a" : Number(p).toFixed(2));

  const BADGES = {
    covid: ["+", "covid"],
    non_covid: ["\u2212", "non-covid"],
    uncertain: ["?", "uncertain"],
    pending: ["\u2026", "pending"],
    skipped: ["\u2298", "skipped"],
  };
  function badge(kind, extra, small) {
    const [sym, text] = BADGES[kind] || ["", kind];
    return h(
      "span",
      { class: `badge ${kind}${small ? " small" : ""}`, dataset: { verdict: kind } },
      h("span", { class: "sym", "aria-hidden": "true", text: sym }),
      " ",
      text,
      extra ? h("span", { class: "extra", text: extra }) : null,
    );
  }

  // A 0..1 scale with the uncertain band shaded, the threshold ticked and the score marked.
  function scale(score, threshold, band) {
    const pct = (v) => `${Math.max(0, Math.min(1, v)) * 100}%`;
    const lo = Math.max(0, threshold - band);
    const hi = Math.min(1, threshold + band);
    return h(
      "div",
      {
        class: "scale",
        role: "img",
        "aria-label": `score ${fmtP(score)}, threshold ${fmtP(threshold)}, uncertain from ${fmtP(lo)} to ${fmtP(hi)}`,
      },
      h("span", { class: "band", style: `left:${pct(lo)};width:${pct(hi - lo)}` }),
      h("span", { class: "tick", style: `left:${pct(threshold)}` }),
      score === null || score === undefined
        ? null
        : h("span", { class: "mark", style: `left:${pct(score)}` }),
    );
  }

  // -- model banner -------------------------------------------------------------------------

  function renderModel(model) {
    if (!model) return;
    $("model").textContent = model.loaded ? model.version : "none (waiting)";
    const detail = model.loaded
      ? `${model.arch} \u00b7 threshold ${fmtP(model.threshold)} \u00b1 ${fmtP(model.uncertain_band)}` +
        (model.calibrated ? " (calibrated)" : " (uncalibrated)")
      : "";
    $("model-detail").textContent = detail;
    const banner = $("banner");
    if (!banner) return;
    const list = banner.querySelector("ul");
    list.replaceChildren(...model.warnings.map((w) => h("li", { text: w })));
    banner.hidden = model.warnings.length === 0;
    banner.classList.toggle("severe", !model.loaded || Boolean(model.untrained));
  }

  // -- studies ------------------------------------------------------------------------------

  function filterValues() {
    const out = {};
    for (const name of FILTERS) {
      const value = $(name).value.trim();
      if (value) out[name] = value;
    }
    return out;
  }

  function queryString(extra) {
    const q = new URLSearchParams(Object.assign(filterValues(), extra || {}));
    if (state.offset) q.set("offset", String(state.offset));
    return q.toString();
  }

  async function load(force) {
    const qs = queryString();
    let page;
    try {
      page = await api(withToken("/api/studies?" + qs));
    } catch (err) {
      statusLine.textContent = "Could not load studies: " + err.message;
      statusLine.classList.add("error");
      return;
    }
    statusLine.classList.remove("error");
    const text = JSON.stringify(page);
    if (!force && text === state.lastJson) return;
    state.lastJson = text;
    renderModel(page.model);
    await Promise.all([...state.expanded].map((uid) => loadSlices(uid).catch(() => null)));
    // A re-render must not throw a keyboard user back to the top: refocus the same control.
    const focusKey = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.focus
      : undefined;
    renderStudies(page);
    renderPager(page);
    if (focusKey) {
      const again = studiesEl.querySelector(`[data-focus="${CSS.escape(focusKey)}"]`);
      if (again) again.focus();
    }
    openFromHash(page);
  }

  // #slice=<id> opens that slice in the viewer (a link a colleague can follow), once.
  let hashDone = false;
  function openFromHash(page) {
    const m = /^#slice=(\d+)$/.exec(window.location.hash);
    if (hashDone || !m) return;
    hashDone = true;
    for (const study of page.studies) {
      for (const series of study.series) {
        const slices = state.fullSlices.get(series.series_instance_uid) || series.key_slices;
        const index = slices.findIndex((sl) => String(sl.id) === m[1]);
        if (index >= 0) return openViewer(slices, index, series, study);
      }
    }
  }

  function renderStudies(page) {
    if (!page.available) {
      studiesEl.replaceChildren(
        h("p", { class: "empty", text: "This node's database does not group slices into series yet: see All slices." }),
      );
      statusLine.textContent = "";
      return;
    }
    const first = page.total ? page.offset + 1 : 0;
    const last = page.offset + page.studies.length;
    statusLine.textContent = page.total
      ? `Studies ${first}\u2013${last} of ${page.total}, newest first`
      : "0 studies";
    if (!page.studies.length) {
      const filtered = Object.keys(filterValues()).some((k) => k !== "limit");
      const text = filtered
        ? "No studies match these filters."
        : "No studies received yet: images sent to the node (inbox folder or DICOM C-STORE) appear here.";
      studiesEl.replaceChildren(h("p", { class: "empty", text }));
      return;
    }
    studiesEl.replaceChildren(...page.studies.map(renderStudy));
  }

  function renderStudy(study) {
    const meta = [
      ["Patient ID", study.patient_id || "\u2013"],
      ["Accession", study.accession_number || "\u2013"],
      ["Study date", `${fmtDa(study.study_date)} ${fmtTm(study.study_time)}`.trim() || "\u2013"],
      ["Referring", study.referring_physician ? fmtName(study.referring_physician) : "\u2013"],
      ["Received", fmtWhen(study.last_seen)],
    ];
    const hidden = study.n_series - study.series.length;
    return h(
      "section",
      { class: "study", dataset: { studyUid: study.study_instance_uid } },
      h(
        "header",
        { class: "study-head" },
        h(
          "div",
          { class: "study-title" },
          h("h2", { class: "patient-name", text: fmtName(study.patient_name) }),
          h("span", { class: "study-desc", text: study.study_description || "(no study description)" }),
        ),
        h(
          "dl",
          { class: "study-meta" },
          meta.map(([k, v]) => h("div", {}, h("dt", { text: k }), h("dd", { text: v }))),
        ),
      ),
      study.series.length
        ? h(
            "table",
            { class: "series-table" },
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                ["Series", "Slices", "Verdict", "Score vs threshold", "Radiologist label", ""].map((t) =>
                  h("th", { scope: "col", text: t }),
                ),
              ),
            ),
            study.series.map((s) => renderSeries(s, study)),
          )
        : h("p", { class: "empty", text: "No series received yet." }),
      hidden > 0
        ? h("p", { class: "hidden-note", text: `${hidden} other series of this study hidden by the filter.` })
        : null,
    );
  }

  function verdictCell(s) {
    if (s.state === "skipped") {
      const reason = s.skip_reason || "no reason given";
      const why = reason.startsWith("not_chest:") ? `not chest (${reason.slice(10)})` : reason;
      return h("td", { class: "verdict" }, badge("skipped"), h("div", { class: "why", text: `skipped: ${why}` }));
    }
    if (s.state === "pending") {
      const expected = s.expected_instances ? ` of ${s.expected_instances}` : "";
      return h("td", { class: "verdict" }, badge("pending"), h("div", { class: "why", text: `series open: ${s.n_instances || 0}${expected} received` }));
    }
    const note = s.state === "uncertain" ? "score inside the uncertain band: no call" : null;
    return h("td", { class: "verdict" }, badge(s.state), note ? h("div", { class: "why", text: note }) : null);
  }

  function scoreCell(s) {
    if (s.state === "skipped" || s.score === null || s.score === undefined) {
      return h("td", { class: "score muted", text: s.state === "pending" ? "waiting for the series to complete" : "\u2013" });
    }
    const th = s.threshold === null || s.threshold === undefined ? 0.5 : Number(s.threshold);
    const band = s.uncertain_band === null || s.uncertain_band === undefined ? 0 : Number(s.uncertain_band);
    const cmp = s.score >= th ? "\u2265" : "<";
    return h(
      "td",
      { class: "score" },
      scale(Number(s.score), th, band),
      h("div", { class: "score-text" }, h("strong", { text: fmtP(s.score) }), ` ${cmp} ${fmtP(th)}`, h("span", { class: "muted", text: ` (uncertain ${fmtP(Math.max(0, th - band))}\u2013${fmtP(Math.min(1, th + band))})` })),
      h(
        "div",
        { class: "rule muted" },
        `${s.rule || "rule ?"} \u00b7 ${s.n_slices_used ?? "?"} slices \u00b7 model ${s.model_version || "?"}`,
        s.calibrated ? "" : " \u00b7 ",
        s.calibrated ? null : h("span", { class: "uncal", text: "uncalibrated" }),
      ),
    );
  }

  function labelSummary(labels, total) {
    const parts = [];
    if (labels.covid) parts.push(`covid ${labels.covid}`);
    if (labels.non_covid) parts.push(`non-covid ${labels.non_covid}`);
    if (!parts.length) return h("div", { class: "label-summary muted", text: "not labelled" });
    const unlabelled = total - labels.covid - labels.non_covid;
    return h(
      "div",
      { class: "label-summary" },
      h("strong", { text: parts.join(", ") }),
      unlabelled > 0 ? ` (${unlabelled} unlabelled)` : "",
      h("div", { class: "who muted", text: `last by ${labels.last_who} at ${fmtWhen(labels.last_at)}` }),
    );
  }

  function labelButtons(onLabel, what, caption, focusPrefix) {
    const button = (label, text) =>
      h(
        "button",
        {
          type: "button",
          class: `label ${label}`,
          dataset: focusPrefix ? { label, focus: `${focusPrefix}:${label}` } : { label },
          onclick: () => onLabel(label),
        },
        text,
      );
    return h(
      "div",
      { class: "label-buttons", role: "group", "aria-label": `Label ${what}` },
      caption ? h("span", { class: "caption muted", text: caption }) : null,
      button("covid", "covid"),
      button("non_covid", "non-covid"),
    );
  }

  function renderSeries(s, study) {
    const uid = s.series_instance_uid;
    const msg = h("p", { class: "msg", "aria-live": "polite", text: state.flash.get(uid) || "" });
    const descr = [s.body_part, s.protocol_name].filter(Boolean).join(" \u00b7 ");
    const expected = s.expected_instances ? ` / ${s.expected_instances}` : "";
    const expanded = state.expanded.has(uid);
    const slices = expanded && state.fullSlices.has(uid) ? state.fullSlices.get(uid) : s.key_slices;
    const main = h(
      "tr",
      { class: `series state-${s.state}`, dataset: { seriesUid: uid } },
      h(
        "td",
        { class: "series-name" },
        h("div", { class: "series-desc", text: s.series_description || "(no series description)" }),
        h("div", { class: "muted", text: [`#${s.series_number ?? "?"}`, s.modality, descr].filter(Boolean).join(" \u00b7 ") }),
      ),
      h(
        "td",
        { class: "count" },
        `${s.n_slices} predicted`,
        h("div", { class: "muted", text: `${s.n_instances ?? 0}${expected} received` }),
        s.completed_at ? h("div", { class: "muted", text: `done ${fmtWhen(s.completed_at)}` }) : null,
      ),
      verdictCell(s),
      scoreCell(s),
      h(
        "td",
        { class: "labels" },
        labelSummary(s.labels, s.n_slices),
        s.n_slices
          ? labelButtons((label) => labelSeries(uid, label, msg), "every slice of this series", "Label series:", uid)
          : null,
        msg,
      ),
      h(
        "td",
        { class: "actions" },
        s.n_slices
          ? h(
              "button",
              {
                type: "button",
                class: "expand",
                dataset: { focus: `${uid}:expand` },
                "aria-expanded": expanded ? "true" : "false",
                onclick: () => toggleSeries(uid),
              },
              expanded ? "Key slices only" : `All ${s.n_slices} slices`,
            )
          : null,
      ),
    );
    const strip = h(
      "tr",
      { class: expanded ? "slices-row expanded" : "slices-row" },
      h(
        "td",
        { colspan: "6" },
        slices.length
          ? h(
              "div",
              { class: "slices" },
              h("div", { class: "slices-caption muted", text: expanded ? "All slices, in arrival order" : "Key slices, highest P(covid) first" }),
              h("div", { class: "slice-grid" }, slices.map((sl, i) => renderSlice(sl, i, slices, s, study))),
            )
          : h("div", { class: "muted", text: s.state === "skipped" ? "Not predicted: the series is not a chest CT." : "No slices predicted yet." }),
      ),
    );
    return h("tbody", { class: "series-group" }, main, strip);
  }

  function renderSlice(sl, index, slices, series, study) {
    const human = sl.human_label
      ? h("div", { class: "human", text: `label ${sl.human_label === "covid" ? "covid" : "non-covid"} \u00b7 ${sl.labelled_by}` })
      : null;
    return h(
      "figure",
      { class: "slice", dataset: { id: sl.id, uid: sl.sop_instance_uid } },
      h(
        "button",
        {
          type: "button",
          class: "open",
          dataset: { focus: `slice:${sl.id}` },
          "aria-label": `Open slice ${index + 1}, P(covid) ${fmtP(sl.prob_covid)}, ${sl.verdict}`,
          onclick: () => openViewer(slices, index, series, study),
        },
        h("img", { class: "thumb", loading: "lazy", alt: "", width: "96", height: "96", src: withToken(sl.thumbnail) }),
      ),
      h(
        "figcaption",
        {},
        badge(sl.verdict || "pending", null, true),
        h("span", { class: "p", text: `P(covid) ${fmtP(sl.prob_covid)}` }),
        sl.frame ? h("span", { class: "muted", text: ` f${sl.frame}` }) : null,
        human,
      ),
    );
  }

  async function loadSlices(uid) {
    const detail = await api(withToken(`/api/series/${encodeURIComponent(uid)}?limit=2000`));
    state.fullSlices.set(uid, detail.slices);
  }

  async function toggleSeries(uid) {
    if (state.expanded.has(uid)) {
      state.expanded.delete(uid);
      state.fullSlices.delete(uid);
    } else {
      state.expanded.add(uid);
    }
    await load(true); // keeps the focus on the expand button (data-focus)
  }

  // -- labels -------------------------------------------------------------------------------

  // The reader's initials sign every label; the viewer has its own field (a modal dialog
  // makes the page behind it unreachable), kept in step with the one in the filter bar.
  function reader(msgEl) {
    const input = viewer.open ? $("viewer-who") : whoInput;
    const who = input.value.trim();
    if (!who) {
      msgEl.textContent = "Enter your initials as Reader first: labels are signed with them.";
      msgEl.classList.add("error");
      input.focus();
      return null;
    }
    return who;
  }

  async function labelSeries(uid, label, msgEl) {
    const who = reader(msgEl);
    if (!who) return;
    msgEl.classList.remove("error");
    msgEl.textContent = "saving\u2026";
    try {
      const r = await api(`/api/series/${encodeURIComponent(uid)}/label`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ label, who }),
      });
      state.flash.set(uid, `${r.slices} slices labelled ${label === "covid" ? "covid" : "non-covid"} by ${who} (${r.changed} changed)`);
      await load(true);
    } catch (err) {
      msgEl.textContent = "error: " + err.message;
      msgEl.classList.add("error");
    }
  }

  async function labelSlice(sl, label, msgEl) {
    const who = reader(msgEl);
    if (!who) return false;
    msgEl.classList.remove("error");
    try {
      await api("/api/labels", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        // One frame of a multi-frame file is labelled alone; a single-frame file as a whole.
        body: JSON.stringify(
          Object.assign({ sop_instance_uid: sl.sop_instance_uid, label, who }, sl.n_frames > 1 ? { frame: sl.frame } : {}),
        ),
      });
      sl.human_label = label;
      sl.labelled_by = who;
      sl.labelled_at = Date.now() / 1000;
      msgEl.textContent = `labelled ${label === "covid" ? "covid" : "non-covid"} by ${who}`;
      return true;
    } catch (err) {
      msgEl.textContent = "error: " + err.message;
      msgEl.classList.add("error");
      return false;
    }
  }

  // -- viewer -------------------------------------------------------------------------------

  const viewer = $("viewer");
  function openViewer(slices, index, series, study) {
    state.viewer = { slices, index, series, study };
    showViewerSlice();
    if (!viewer.open) viewer.showModal();
    // Focus a harmless button: Enter must never label a slice by accident.
    const start = $("viewer-next").disabled ? $("viewer-close") : $("viewer-next");
    start.focus();
  }

  function showViewerSlice() {
    const v = state.viewer;
    const sl = v.slices[v.index];
    viewer.dataset.id = String(sl.id);
    const img = $("viewer-img");
    img.src = withToken(`${sl.image}?size=512`);
    img.alt = `Slice ${v.index + 1} of ${v.slices.length}, lung window`;
    $("viewer-title").textContent = `${fmtName(v.study.patient_name)} \u00b7 slice ${v.index + 1} of ${v.slices.length}`;
    const rows = [
      ["Patient ID", v.study.patient_id || "\u2013"],
      ["Accession", v.study.accession_number || "\u2013"],
      ["Study", `${fmtDa(v.study.study_date)} ${v.study.study_description || ""}`.trim()],
      ["Series", v.series.series_description || "(no description)"],
      ["P(covid)", h("strong", { text: fmtP(sl.prob_covid) })],
      ["Slice verdict", badge(sl.verdict || "pending")],
      ["Series verdict", badge(v.series.state)],
      ["Model version", sl.model_version],
      sl.frame ? ["Frame", String(sl.frame)] : null,
      [
        "Label",
        sl.human_label
          ? `${sl.human_label === "covid" ? "covid" : "non-covid"} by ${sl.labelled_by} at ${fmtEpoch(sl.labelled_at)}`
          : "not labelled",
      ],
    ];
    $("viewer-meta").replaceChildren(...rows.filter(Boolean).map(([k, val]) => h("div", {}, h("dt", { text: k }), h("dd", {}, val))));
    const msg = $("viewer-msg");
    msg.textContent = "";
    msg.classList.remove("error");
    $("viewer-labels").replaceChildren(
      labelButtons(async (label) => {
        if (await labelSlice(sl, label, msg)) {
          showViewerSlice();
          $("viewer-msg").textContent = `labelled ${label === "covid" ? "covid" : "non-covid"} by ${sl.labelled_by}`;
          state.lastJson = ""; // refresh the list behind the dialog on the next tick
        }
      }, "this slice", "Label slice:"),
    );
    $("viewer-prev").disabled = v.index === 0;
    $("viewer-next").disabled = v.index === v.slices.length - 1;
  }

  function step(delta) {
    const v = state.viewer;
    if (!v) return;
    const next = v.index + delta;
    if (next < 0 || next >= v.slices.length) return;
    v.index = next;
    showViewerSlice();
  }

  $("viewer-prev").addEventListener("click", () => step(-1));
  $("viewer-next").addEventListener("click", () => step(1));
  $("viewer-close").addEventListener("click", () => viewer.close());
  viewer.addEventListener("close", () => {
    state.viewer = null;
    load(true);
  });
  viewer.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement) return;
    if (event.key === "ArrowLeft") step(-1);
    else if (event.key === "ArrowRight") step(1);
    else if (event.key === "c" || event.key === "n") {
      const button = $("viewer-labels").querySelector(`button.label.${event.key === "c" ? "covid" : "non_covid"}`);
      if (button) button.click();
    } else return;
    event.preventDefault();
  });

  // -- pager and filters --------------------------------------------------------------------

  function renderPager(page) {
    const limit = page.limit;
    const pages = Math.max(1, Math.ceil(page.total / limit));
    pagerEl.hidden = page.total <= limit && page.offset === 0;
    const current = Math.floor(page.offset / limit) + 1;
    const go = (offset) => () => {
      state.offset = Math.max(0, offset);
      syncUrl();
      load(true);
    };
    pagerEl.replaceChildren(
      h("button", { type: "button", disabled: current <= 1, onclick: go(0) }, "\u00ab First"),
      h("button", { type: "button", disabled: current <= 1, onclick: go(page.offset - limit) }, "\u2039 Previous"),
      h("span", { class: "page-no", text: `page ${current} of ${pages}` }),
      h("button", { type: "button", disabled: current >= pages, onclick: go(page.offset + limit) }, "Next \u203a"),
    );
  }

  function syncUrl() {
    const q = new URLSearchParams(filterValues());
    if (state.offset) q.set("offset", String(state.offset));
    if (token) q.set("token", token);
    const s = q.toString();
    window.history.replaceState(null, "", s ? "?" + s : window.location.pathname);
  }

  for (const name of FILTERS) {
    const value = params.get(name);
    if (!value) continue;
    const el = $(name);
    // A page size from a link (?limit=5) that the menu lacks is added, not silently dropped.
    if (name === "limit" && ![...el.options].some((o) => o.value === value) && /^\d+$/.test(value)) {
      el.append(h("option", { text: value }));
    }
    el.value = value;
  }
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.offset = 0;
    syncUrl();
    load(true);
  });
  $("clear").addEventListener("click", () => {
    for (const name of FILTERS) $(name).value = name === "limit" ? "20" : "";
    state.offset = 0;
    syncUrl();
    load(true);
  });
  const viewerWho = $("viewer-who");
  whoInput.value = viewerWho.value = window.localStorage.getItem("fedscan.reader") || "";
  for (const [input, other] of [[whoInput, viewerWho], [viewerWho, whoInput]]) {
    input.addEventListener("input", () => {
      other.value = input.value;
      window.localStorage.setItem("fedscan.reader", input.value.trim());
    });
  }
  // Compact list: hide the key-slice strips (the choice is remembered on this workstation).
  const showSlices = $("show-slices");
  showSlices.checked = window.localStorage.getItem("fedscan.compact") !== "1";
  const applyCompact = () => document.body.classList.toggle("compact", !showSlices.checked);
  applyCompact();
  showSlices.addEventListener("change", () => {
    window.localStorage.setItem("fedscan.compact", showSlices.checked ? "0" : "1");
    applyCompact();
  });
  const slicesLink = $("slices-link");
  slicesLink.setAttribute("href", withToken(slicesLink.getAttribute("href")));

  load(true);
  // New slices and completed series appear without a reload; skipped while the reader is
  // typing or a slice is open, so focus never jumps.
  // The poll asks only for a change token; the study list is fetched when it moved.
  let lastChanges = null;
  setInterval(async () => {
    if (viewer.open || document.hidden) return;
    const active = document.activeElement;
    if (active && $("filters").contains(active) && active.tagName !== "BUTTON") return;
    try {
      const { changes } = await api(withToken("/api/changes"));
      if (lastChanges !== null && changes === lastChanges) return;
      lastChanges = changes;
    } catch (err) {
      // the node may be restarting: try the list itself, which reports the error
    }
    load(false);
  }, 5000);
})();

/* diffsae dashboards: sortable + filterable tables and the recovery score selector.
   Plain DOM, no network, no innerHTML: data is only ever read with textContent / dataset.
   State lives in the URL hash (#sort=<key>&dir=asc|desc&q=<text>) so views can be linked. */
(function () {
  "use strict";

  function cellValue(row, idx, type) {
    var cell = row.cells[idx];
    if (!cell) { return type === "num" ? NaN : ""; }
    if (type === "num") {
      var v = parseFloat(cell.getAttribute("data-v"));
      return isNaN(v) ? NaN : v;
    }
    return cell.textContent.trim().toLowerCase();
  }

  function sortTable(table, key, dir) {
    var headers = table.tHead.rows[0].cells;
    var idx = -1, type = "text";
    for (var i = 0; i < headers.length; i++) {
      if (headers[i].getAttribute("data-key") === key) { idx = i; type = headers[i].getAttribute("data-type"); }
      headers[i].removeAttribute("aria-sort");
    }
    if (idx < 0) { return false; }
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === "asc" ? 1 : -1;
    rows.sort(function (a, b) {
      var x = cellValue(a, idx, type), y = cellValue(b, idx, type);
      if (type === "num") {
        if (isNaN(x) && isNaN(y)) { return 0; }
        if (isNaN(x)) { return 1; }
        if (isNaN(y)) { return -1; }
        return sign * (x - y);
      }
      return sign * (x < y ? -1 : x > y ? 1 : 0);
    });
    rows.forEach(function (r) { body.appendChild(r); });
    headers[idx].setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
    table.setAttribute("data-sort-key", key);
    table.setAttribute("data-sort-dir", dir);
    return true;
  }

  function filterTable(table, query) {
    var terms = query.toLowerCase().split(/\s+/).filter(function (t) { return t.length > 0; });
    var shown = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      var text = row.textContent.toLowerCase();
      var ok = terms.every(function (t) { return text.indexOf(t) >= 0; });
      row.hidden = !ok;
      if (ok) { shown++; }
    });
    table.setAttribute("data-visible-rows", String(shown));
    var count = document.getElementById(table.id + "-count");
    if (count) { count.textContent = shown + " of " + table.tBodies[0].rows.length + " shown"; }
  }

  function readHash() {
    var state = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv.length === 2) {
        try { state[kv[0]] = decodeURIComponent(kv[1].replace(/\+/g, " ")); } catch (e) { /* ignore bad escapes */ }
      }
    });
    return state;
  }

  function writeHash(state) {
    var parts = [];
    Object.keys(state).forEach(function (k) {
      if (state[k]) { parts.push(k + "=" + encodeURIComponent(state[k])); }
    });
    try { history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname); }
    catch (e) { /* some file:// contexts refuse; the view still works */ }
  }

  function setupSortable(table, state) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th) {
      var key = th.getAttribute("data-key");
      if (!key) { return; }
      th.tabIndex = 0;
      th.classList.add("sort-handle");
      function activate() {
        var same = table.getAttribute("data-sort-key") === key;
        var dir = same && table.getAttribute("data-sort-dir") === "desc" ? "asc" : "desc";
        if (!same && key === "rank") { dir = "asc"; }
        sortTable(table, key, dir);
        state.sort = key; state.dir = dir; writeHash(state);
      }
      th.addEventListener("click", activate);
      th.addEventListener("keydown", function (ev) { if (ev.key === "Enter") { activate(); } });
    });
    if (state.sort) { sortTable(table, state.sort, state.dir === "asc" ? "asc" : "desc"); }
  }

  function setupFilter(input, state) {
    var table = document.getElementById(input.getAttribute("data-table"));
    if (!table) { return; }
    if (state.q) { input.value = state.q; }
    filterTable(table, input.value);
    input.addEventListener("input", function () {
      filterTable(table, input.value);
      state.q = input.value; writeHash(state);
    });
  }

  function setupScoreSelect(select) {
    var table = document.getElementById(select.getAttribute("data-target"));
    if (!table) { return; }
    function apply() {
      Array.prototype.forEach.call(table.tBodies, function (tb) {
        tb.hidden = tb.getAttribute("data-score") !== select.value;
      });
      table.setAttribute("data-score", select.value);
    }
    select.addEventListener("change", apply);
    apply();
  }

  function applyHash(state) {
    var fresh = readHash();
    state.sort = fresh.sort; state.dir = fresh.dir; state.q = fresh.q;
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (t) {
      if (state.sort) { sortTable(t, state.sort, state.dir === "asc" ? "asc" : "desc"); }
    });
    Array.prototype.forEach.call(document.querySelectorAll("input.filter"), function (i) {
      var table = document.getElementById(i.getAttribute("data-table"));
      i.value = state.q || "";
      if (table) { filterTable(table, i.value); }
    });
  }

  function init() {
    var state = readHash();
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (t) { setupSortable(t, state); });
    Array.prototype.forEach.call(document.querySelectorAll("input.filter"), function (i) { setupFilter(i, state); });
    Array.prototype.forEach.call(document.querySelectorAll("select#score-select"), setupScoreSelect);
    window.addEventListener("hashchange", function () { applyHash(state); });
    document.documentElement.setAttribute("data-app", "ready");
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); } else { init(); }
}());

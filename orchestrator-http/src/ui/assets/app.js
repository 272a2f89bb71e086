// The dashboard's script: sends `form.api` forms to the JSON API (with the session's CSRF token), shows
// API errors with their request id, refreshes the `[data-live]` parts of the page, and follows a run's log
// over server-sent events (resuming after the last line seen).
"use strict";
(function () {
  const meta = (name) => {
    const m = document.querySelector(`meta[name="${name}"]`);
    return m ? m.getAttribute("content") : null;
  };
  const API = meta("api-base") || "";
  const CSRF = meta("csrf-token");

  function setPath(obj, path, value) {
    const keys = path.split(".");
    let o = obj;
    for (let i = 0; i < keys.length - 1; i++) {
      o = o[keys[i]] = o[keys[i]] || {};
    }
    o[keys[keys.length - 1]] = value;
  }

  function getPath(obj, path) {
    return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
  }

  async function call(method, path, body) {
    const headers = { Accept: "application/json" };
    if (CSRF) headers["X-CSRF-Token"] = CSRF;
    const init = { method, headers, credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(API + path, init);
    } catch (e) {
      throw { message: "the server cannot be reached (" + e.message + ")", code: "network" };
    }
    const text = await resp.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch (_) {
      json = null;
    }
    if (!resp.ok) {
      const err = (json && json.error) || { message: text || resp.statusText, code: String(resp.status) };
      err.request_id = err.request_id || resp.headers.get("x-request-id");
      throw err;
    }
    return json;
  }

  function showError(form, err, prefix) {
    const box = form.querySelector(".form-error");
    box.textContent = "";
    const p = document.createElement("p");
    p.textContent = (prefix || "") + err.message + (err.code ? " (" + err.code + ")" : "");
    box.appendChild(p);
    const errors = err.details && Array.isArray(err.details.errors) ? err.details.errors : [];
    if (errors.length) {
      const ul = document.createElement("ul");
      for (const e of errors) {
        const li = document.createElement("li");
        const at = e.line ? "line " + e.line + (e.column ? ", column " + e.column : "") + ": " : "";
        li.textContent = at + (e.path ? e.path + ": " : "") + e.message;
        ul.appendChild(li);
      }
      box.appendChild(ul);
    }
    if (err.request_id) {
      const rid = document.createElement("p");
      rid.className = "small";
      rid.textContent = "request id " + err.request_id;
      box.appendChild(rid);
    }
  }

  function collect(form) {
    const body = {};
    let recipe = null;
    for (const el of form.elements) {
      if (!el.name || el.disabled || el.type === "submit") continue;
      const kind = el.dataset.kind || "text";
      let v;
      switch (kind) {
        case "bool":
          v = el.checked;
          break;
        case "multi":
          v = Array.from(el.selectedOptions).map((o) => o.value);
          break;
        case "int":
          if (el.value.trim() === "") continue;
          v = parseInt(el.value, 10);
          break;
        case "float":
          if (el.value.trim() === "") continue;
          v = parseFloat(el.value);
          break;
        case "csv":
          v = el.value.split(",").map((s) => s.trim()).filter(Boolean);
          break;
        case "requirements":
          v = el.value.split("\n").map((s) => s.trim()).filter(Boolean).map((title) => ({ title }));
          break;
        case "after-seconds":
          if (el.value.trim() === "") continue;
          v = new Date(Date.now() + 1000 * parseFloat(el.value)).toISOString();
          break;
        case "recipe":
          if (el.value.trim() !== "") recipe = el.value;
          continue;
        default:
          if (el.value.trim() === "") continue;
          v = el.value;
      }
      setPath(body, el.name, v);
    }
    return { body, recipe };
  }

  async function submit(form, ev) {
    ev.preventDefault();
    const button = form.querySelector("button[type=submit]");
    const box = form.querySelector(".form-error");
    for (const el of form.querySelectorAll("[required]")) {
      if (!el.value.trim()) {
        box.textContent = "Fill in “" + (form.querySelector(`label[for="${el.id}"]`) || {}).textContent + "”.";
        el.focus();
        return;
      }
    }
    box.textContent = "";
    if (button) button.disabled = true;
    try {
      const { body, recipe } = collect(form);
      if (recipe !== null) {
        try {
          const r = await call("POST", "/recipes", { yaml: recipe, project_id: body.project_id });
          body.recipe_id = r.id;
        } catch (err) {
          showError(form, err, "Recipe: ");
          return;
        }
      }
      const answer = await call(form.dataset.method || "POST", form.dataset.api, body);
      const next = form.dataset.next || "reload";
      if (next === "reload") {
        location.reload();
      } else {
        location.assign(next.replace(/\{([a-z_.]+)\}/g, (_, p) => encodeURIComponent(getPath(answer, p))));
      }
    } catch (err) {
      showError(form, err);
    } finally {
      if (button) button.disabled = false;
    }
  }

  document.addEventListener("submit", (ev) => {
    const form = ev.target;
    if (form instanceof HTMLFormElement && form.classList.contains("api")) submit(form, ev);
  });

  // ---- live regions ----
  function busy(region) {
    if (region.contains(document.activeElement) && document.activeElement !== document.body) return true;
    for (const el of region.querySelectorAll("input, textarea, select")) {
      if (el.type === "hidden") continue;
      if ((el.type === "checkbox" && el.checked !== el.defaultChecked) || (el.value !== el.defaultValue && el.tagName !== "SELECT")) return true;
    }
    return false;
  }

  async function refresh() {
    const regions = document.querySelectorAll("[data-live][id]");
    if (!regions.length || document.hidden) return;
    try {
      const resp = await fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!resp.ok || resp.redirected) return;
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      for (const region of regions) {
        const fresh = doc.getElementById(region.id);
        if (fresh && fresh.innerHTML !== region.innerHTML && !busy(region)) region.innerHTML = fresh.innerHTML;
      }
    } catch (_) {
      /* try again next time */
    }
  }
  if (document.querySelector("[data-live]")) setInterval(refresh, 2500);

  // ---- run log ----
  const log = document.getElementById("log");
  if (log && log.dataset.stream) {
    const status = document.getElementById("log-status");
    let last = 0;
    let es = null;
    let ended = false;
    const say = (t) => {
      if (status) status.textContent = t;
    };
    const connect = () => {
      es = new EventSource(API + log.dataset.stream + (last ? "?after=" + last : ""));
      es.onopen = () => say("live");
      es.addEventListener("log", (e) => {
        let entry;
        try {
          entry = JSON.parse(e.data);
        } catch (_) {
          return;
        }
        if (entry.seq <= last) return;
        last = entry.seq;
        const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
        const span = document.createElement("span");
        span.className = entry.stream === "stderr" ? "stderr" : entry.stream === "system" ? "system" : "";
        span.textContent = entry.line + "\n";
        log.appendChild(span);
        if (stick) log.scrollTop = log.scrollHeight;
      });
      es.addEventListener("end", (e) => {
        ended = true;
        es.close();
        let state = "";
        try {
          state = JSON.parse(e.data).state;
        } catch (_) {}
        say("finished: " + state);
        log.dataset.ended = state || "yes";
        refresh();
      });
      es.onerror = () => {
        if (ended) return;
        // EventSource reconnects by itself (sending Last-Event-ID) unless the server refused the stream.
        if (es.readyState === EventSource.CLOSED) {
          say("reconnecting…");
          setTimeout(connect, 2000);
        } else {
          say("reconnecting…");
        }
      };
    };
    connect();
  }
})();

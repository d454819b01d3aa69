// Security and audit pages of the sidecar: your own sign-in methods, the org MFA policy, the
// IP lists, and the audit log table. Plain ES2020, no dependencies. What the page knows comes
// from data- attributes on <main> (prefix, CSRF token, settings version): no inline script, so
// a strict CSP can apply. Text from the server goes into the page through textContent only.
"use strict";

(() => {
  const main = document.querySelector("main[data-page]");
  if (!main) return;
  const byId = (id) => document.getElementById(id);
  const prefix = main.dataset.prefix || "";
  let csrfToken = main.dataset.csrfToken || "";
  const statusEl = byId("mfa-status");
  const FLASH = "sidecar-security-flash";


  // Mirrors sidecar.paths.is_local_path, the one rule for redirect targets (keep them the
  // same): exactly one leading "/", and no "\\" or control character anywhere, because the
  // URL parser reads "\\" as "/" and drops tab/CR/LF, so "/\\host" or "/<tab>/host" would
  // become "//host" (another site). Anything else goes to "/".
  const localPath = (p) => (typeof p === "string" && p.startsWith("/") && !p.startsWith("//")
    && !/[\\\u0000-\u001f\u007f-\u009f]/.test(p) ? p : "/");
  const plural = (n, unit) => `${n} ${unit}${n === 1 ? "" : "s"}`;
  const make = (tag, props) => Object.assign(document.createElement(tag), props);
  const say = (text, kind = "info") => {
    statusEl.textContent = text;
    statusEl.dataset.kind = kind;
  };

  class ApiError extends Error {
    constructor(status, body) {
      super(body && typeof body.message === "string" ? body.message
        : `Something went wrong (HTTP ${status}). Please try again.`);
      this.body = body || {};
      this.code = this.body.error ? String(this.body.error) : `http_${status}`;
      this.redirecting = false;
    }
  }

  // One JSON call. A renewed session's CSRF token is taken up; a stale one is refreshed and the
  // call retried once; step_up_required sends the browser to the verify page it names.
  async function api(method, path, body, retried = false) {
    const headers = { Accept: "application/json", "X-CSRF-Token": csrfToken };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(`${prefix}/api/${path}`, { method, headers, credentials: "same-origin",
        body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      throw new ApiError(0, { error: "network",
        message: "Can't reach the server. Check your connection and try again." });
    }
    const data = await res.json().catch(() => null);
    if (data && typeof data.csrf_token === "string") csrfToken = data.csrf_token;
    if (res.ok) return data || {};
    const error = new ApiError(res.status, data);
    if (error.code === "step_up_required") {
      error.redirecting = true;
      say("Confirm it's you again to continue…");
      window.location.assign(localPath(error.body.location || `${prefix}/verify`));
    } else if (res.status === 403 && !retried && /csrf/i.test(error.code)) {
      const fresh = await fetch(`${prefix}/api/status`, { credentials: "same-origin" })
        .then((r) => (r.ok ? r.json() : null)).catch(() => null);
      if (fresh && fresh.csrf_token) {
        csrfToken = fresh.csrf_token;
        return api(method, path, body, true);
      }
    }
    throw error;
  }

  const report = (err) => { if (!err.redirecting) say(err.message, "error"); };

  // Runs work() with button disabled; a failure goes to the status line unless handle() takes it.
  async function withButton(button, work, handle = report) {
    button.disabled = true;
    try {
      await work();
    } catch (err) {
      if (!err.redirecting) handle(err);
    } finally {
      button.disabled = false;
    }
  }

  const markInvalid = (input, invalid = true) => (invalid
    ? input.setAttribute("aria-invalid", "true") : input.removeAttribute("aria-invalid"));

  // A message that survives the reload after a change (the page then shows the new state).
  function reloadSaying(text) {
    try { sessionStorage.setItem(FLASH, text); } catch (err) { /* storage off: no message */ }
    window.location.reload();
  }

  // --- security page: your own methods ---------------------------------------------------
  function removePasskey(button) {
    const name = button.dataset.passkeyName || "this passkey";
    if (!window.confirm(`Remove the passkey “${name}”? You can't sign in with it after.`)) return;
    const path = `passkeys/${encodeURIComponent(button.dataset.passkeyId)}`;
    withButton(button, async () => {
      try {
        await api("DELETE", path);
      } catch (err) {
        if (err.code !== "confirm_required") throw err;
        if (!window.confirm(`${err.message} Remove it anyway?`)) return say("Nothing was removed.");
        await api("DELETE", `${path}?confirm=true`);
      }
      reloadSaying(`Passkey “${name}” removed.`);
    });
  }

  function personal() {
    for (const button of main.querySelectorAll("button[data-passkey-id]")) {
      button.addEventListener("click", () => removePasskey(button));
    }
    const totpRemove = byId("totp-remove");
    if (totpRemove) {
      totpRemove.addEventListener("click", () => {
        if (!window.confirm("Remove the authenticator app? Its codes will stop working.")) return;
        withButton(totpRemove, async () => {
          await api("DELETE", "totp");
          reloadSaying("Authenticator app removed.");
        });
      });
    }

    const regenerate = byId("recovery-regenerate");
    if (!regenerate) return;
    let codes = [];
    regenerate.addEventListener("click", () => {
      if (!window.confirm("Make new recovery codes? The current ones stop working.")) return;
      withButton(regenerate, async () => {
        const data = await api("POST", "recovery-codes/regenerate", {});
        codes = Array.isArray(data.recovery_codes) ? data.recovery_codes.map(String) : [];
        byId("recovery-codes").replaceChildren(...codes.map((c) => make("li", { textContent: c })));
        const left = byId("recovery-left");
        left.textContent = `You have ${plural(codes.length, "recovery code")} left.`;
        left.classList.remove("notice", "notice-warning");
        const box = byId("recovery-new");
        box.hidden = false;
        box.focus();
        say("New recovery codes made. Save them now: they won't be shown again.", "ok");
      });
    });
    byId("recovery-copy").addEventListener("click", () => navigator.clipboard
      .writeText(codes.join("\n")).then(() => say("Codes copied.", "ok"),
        () => say("Copying isn't allowed here. Select the codes and copy them.", "error")));
    byId("recovery-download").addEventListener("click", () => {
      const who = `${main.dataset.appName || "your account"} (${main.dataset.user || ""})`;
      const text = [`Recovery codes for ${who}`,
        "Each code signs you in once if you lose your passkey or authenticator app.",
        "", ...codes, ""].join("\n");
      const a = make("a", { download: "recovery-codes.txt",
        href: URL.createObjectURL(new Blob([text], { type: "text/plain" })) });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    });
  }

  // --- security page: organization settings (admins) -------------------------------------
  // A PUT with the version this page edits; the answer carries the next version.
  async function putSettings(fields) {
    const saved = await api("PUT", "admin/security",
      { ...fields, version: Number(main.dataset.version) });
    main.dataset.version = String(saved.version);
    byId("settings-conflict").hidden = true;
    return saved;
  }

  // Problems both settings forms share: the version moved (reload), the YAML owns them, ...
  function settingsProblem(err) {
    if (err.code !== "conflict") return report(err);
    byId("settings-conflict-text").textContent = err.message;
    byId("settings-conflict").hidden = false;
    say("Not saved: someone changed the settings meanwhile.", "error");
  }

  function policy() {
    const form = byId("policy-form");
    if (!form) return;
    const grace = byId("grace-hours");
    const preview = byId("policy-preview");
    const chosen = () => (form.querySelector("input[name=mfa_policy]:checked") || {}).value;
    const graceSeconds = () => {
      const hours = Number(grace.value);
      return grace.value.trim() !== "" && Number.isFinite(hours) && hours >= 0
        ? Math.round(hours * 3600) : null;
    };
    let asked = 0;
    let timer = null;

    async function refreshPreview() {
      const seconds = graceSeconds();
      markInvalid(grace, seconds === null);
      if (seconds === null || !chosen()) return;
      const mine = ++asked; // answers may arrive out of order: only the latest one counts
      const query = new URLSearchParams({ mfa_policy: chosen(), grace_period: String(seconds) });
      try {
        const c = await api("GET", `admin/security/preview?${query}`);
        // Same sentence as security_pages.preview_text.
        if (mine === asked) {
          preview.textContent = `${plural(c.enrolled, "user")} enrolled, ${c.grace} would be `
            + `in grace, ${c.blocked} would be blocked`;
        }
      } catch (err) {
        if (mine === asked && !err.redirecting) preview.textContent = `No preview: ${err.message}`;
      }
    }
    form.addEventListener("change", (ev) => ev.target.name === "mfa_policy" && refreshPreview());
    grace.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(refreshPreview, 400);
    });

    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const seconds = graceSeconds();
      if (seconds === null) {
        markInvalid(grace);
        grace.focus();
        return say("Enter the grace period as a number of hours (0 or more).", "error");
      }
      withButton(byId("policy-save"), async () => {
        const saved = await putSettings({ mfa_policy: chosen(), grace_period_seconds: seconds });
        const hours = Number((saved.grace_period_seconds / 3600).toFixed(4));
        byId("grace-current").textContent = hours > 0 ? plural(hours, "hour") : "no grace period";
        markInvalid(grace, false);
        say("MFA policy saved.", "ok");
      }, (err) => {
        const bad = Array.isArray(err.body.errors) ? err.body.errors : [];
        if (bad.some((e) => String(e.field).startsWith("grace"))) markInvalid(grace);
        if (bad.length) say(bad.map((e) => `${e.field}: ${e.reason}`).join("; "), "error");
        else settingsProblem(err);
      });
    });
  }

  function ipLists() {
    const form = byId("ip-form");
    if (!form) return;
    const fields = { ip_allowlist: byId("ip-allowlist"), ip_denylist: byId("ip-denylist") };
    const lockout = byId("ip-lockout");
    const anyway = byId("ip-save-anyway");

    // One "line 4: 10.0.0.0/33 — is not a CIDR" per bad line, under its textarea.
    function showErrors(errors) {
      const other = [];
      for (const [name, area] of Object.entries(fields)) {
        const list = byId(`${area.id}-errors`);
        const mine = errors.filter((e) => e.field === name);
        list.replaceChildren(...mine.map((e) => make("li", { textContent: e.line == null
          ? String(e.reason) : `line ${e.line}: ${String(e.value).trim()} — ${e.reason}` })));
        list.hidden = mine.length === 0;
        markInvalid(area, mine.length > 0);
      }
      for (const e of errors) if (!(e.field in fields)) other.push(`${e.field}: ${e.reason}`);
      const first = Object.values(fields).find((a) => a.getAttribute("aria-invalid") === "true");
      if (first) first.focus();
      return other;
    }

    function send(button, confirmLockout) {
      lockout.hidden = true;
      // Sent as the textareas' text, so the API's line numbers are the lines people see.
      const body = { ip_allowlist: fields.ip_allowlist.value, ip_denylist: fields.ip_denylist.value,
        ...(confirmLockout ? { confirm_lockout: true } : {}) };
      withButton(button, async () => {
        const saved = await putSettings(body);
        showErrors([]);
        fields.ip_allowlist.value = (saved.ip_allowlist || []).join("\n");
        fields.ip_denylist.value = (saved.ip_denylist || []).join("\n");
        say("IP restrictions saved.", "ok");
      }, (err) => {
        const invalid = err.code === "invalid" && Array.isArray(err.body.errors);
        const other = showErrors(invalid ? err.body.errors : []); // stale line errors go
        if (invalid) {
          say([err.message, ...other].join(" "), "error");
        } else if (err.code === "would_lock_you_out") {
          // The API's hint for scripts ("Send confirm_lockout: true…") is the button here.
          const reason = err.message.replace(/\s*Send confirm_lockout.*$/, "");
          byId("ip-lockout-text").textContent =
            `${reason} If you save anyway, you lose access from where you are now.`;
          lockout.hidden = false;
          say("Not saved: this change would lock you out.", "error");
          anyway.focus();
        } else {
          settingsProblem(err);
        }
      });
    }
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      send(byId("ip-save"), false);
    });
    anyway.addEventListener("click", () => send(anyway, true));
  }

  // --- audit page --------------------------------------------------------------------------
  function auditPage() {
    const PAGE = 50;
    const BAD = new Set(["failure", "locked", "denied_ip", "not_allowlisted"]);
    const inputs = { action: byId("audit-action"), actor: byId("audit-actor") };
    const rows = byId("audit-rows");
    const more = byId("audit-more");
    let before = null;

    const initial = new URLSearchParams(window.location.search);
    for (const [name, input] of Object.entries(inputs)) input.value = initial.get(name) || "";
    const filters = () => new URLSearchParams(Object.entries(inputs)
      .map(([name, input]) => [name, input.value.trim()]).filter(([, value]) => value));
    function updateExports() {
      const query = filters();
      query.set("limit", "1000");
      byId("audit-export-json").href = `${prefix}/api/admin/audit?${query}`;
      query.set("format", "csv");
      byId("audit-export-csv").href = `${prefix}/api/admin/audit?${query}`;
    }

    const cell = (text, className = "") => make("td",
      { textContent: text == null ? "" : String(text), className });
    function row(entry) {
      const when = new Date(entry.time);
      const shown = Number.isNaN(when.getTime()) ? String(entry.time)
        : `${when.toISOString().slice(0, 19).replace("T", " ")} UTC`;
      const time = make("time", { dateTime: String(entry.time), textContent: shown });
      const full = Object.entries(entry.details || {})
        .map(([k, v]) => `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`).join("; ");
      const details = cell(full.length > 140 ? `${full.slice(0, 139)}…` : full, "details");
      if (full.length > 140) details.title = full;
      const tr = make("tr");
      tr.append(cell("", "nowrap"), cell(entry.actor), cell(entry.client_ip, "mono"),
        cell(entry.action, "mono"), cell(entry.target),
        cell(entry.outcome, BAD.has(entry.outcome) ? "outcome-bad" : ""), details);
      tr.firstChild.append(time);
      return tr;
    }

    async function load(reset) {
      const query = filters();
      query.set("limit", String(PAGE));
      if (!reset && before !== null) query.set("before", String(before));
      more.disabled = true;
      try {
        const data = await api("GET", `admin/audit?${query}`);
        const entries = Array.isArray(data.entries) ? data.entries : [];
        if (reset) rows.replaceChildren();
        rows.append(...entries.map(row));
        if (entries.length) before = entries[entries.length - 1].seq;
        more.hidden = entries.length < PAGE;
        byId("audit-empty").hidden = rows.childElementCount > 0;
        if (reset) say("");
      } catch (err) {
        report(err);
      } finally {
        more.disabled = false;
      }
    }

    byId("audit-filters").addEventListener("submit", (ev) => {
      ev.preventDefault();
      before = null;
      const query = filters().toString();
      window.history.replaceState(null, "", query ? `?${query}` : window.location.pathname);
      updateExports();
      load(true);
    });
    more.addEventListener("click", () => load(false));
    updateExports();
    load(true);
  }

  if (main.dataset.page === "security") {
    try {
      const flash = sessionStorage.getItem(FLASH);
      sessionStorage.removeItem(FLASH);
      if (flash) say(flash, "ok");
    } catch (err) { /* storage off */ }
    personal();
    policy();
    ipLists();
    // The settings forms are rendered inside <fieldset disabled data-needs-script>: without
    // this script they can't be submitted the browser's way (a GET would put the IP lists in
    // the URL). Enabled now that the handlers, which send them as JSON, are in place.
    for (const el of main.querySelectorAll("[data-needs-script]")) el.disabled = false;
  } else if (main.dataset.page === "audit") {
    auditPage();
  }
})();

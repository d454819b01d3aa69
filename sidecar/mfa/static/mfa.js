// MFA pages of the sidecar: setup (passkey, authenticator app, recovery codes) and verify.
// Plain ES2020, no dependencies. Everything the page knows comes from data- attributes on
// <main> (prefix, CSRF token, next path): no inline script, so a strict CSP can apply.
"use strict";

(() => {
  const main = document.querySelector("main[data-page]");
  if (!main) return;
  const byId = (id) => document.getElementById(id);
  const prefix = main.dataset.prefix || "";
  let csrfToken = main.dataset.csrfToken || "";
  const statusEl = byId("mfa-status");

  // The pages render their forms inside <fieldset disabled data-needs-script>: without this
  // script they can't be submitted the browser's way (a GET would put a code in the URL).
  // Enabled once the page's handlers are in place, which send the values as JSON instead.
  const enableForms = () => {
    for (const el of main.querySelectorAll("[data-needs-script]")) el.disabled = false;
  };

  // Mirrors sidecar.paths.is_local_path, the one rule for redirect targets (keep them the
  // same): exactly one leading "/", and no "\\" or control character anywhere, because the
  // URL parser reads "\\" as "/" and drops tab/CR/LF, so "/\\host" or "/<tab>/host" would
  // become "//host" (another site). Anything else goes to "/".
  const localPath = (p) => (typeof p === "string" && p.startsWith("/") && !p.startsWith("//")
    && !/[\\\u0000-\u001f\u007f-\u009f]/.test(p) ? p : "/");
  const nextPath = localPath(main.dataset.nextPath);
  const goNext = () => window.location.assign(nextPath);

  function say(text, kind = "info") {
    statusEl.textContent = text;
    statusEl.dataset.kind = kind;
  }

  class ApiError extends Error {
    constructor(status, body) {
      super(body && typeof body.message === "string" ? body.message
        : `Something went wrong (HTTP ${status}). Please try again.`);
      this.status = status;
      this.body = body || {};
      this.code = this.body.error ? String(this.body.error) : `http_${status}`;
    }
  }

  async function api(path, body, retried = false) {
    let res;
    try {
      res = await fetch(`${prefix}/api/${path}`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json",
          "X-CSRF-Token": csrfToken },
        body: JSON.stringify(body || {}),
      });
    } catch (err) {
      throw new ApiError(0, { error: "network",
        message: "Can't reach the server. Check your connection and try again." });
    }
    const data = await res.json().catch(() => null);
    if (res.ok) return data || {};
    // A stale CSRF token (the session was renewed in another tab): take a fresh one, retry once.
    if (res.status === 403 && !retried && data && /csrf/i.test(String(data.error || ""))) {
      const fresh = await fetch(`${prefix}/api/status`, { credentials: "same-origin" })
        .then((r) => (r.ok ? r.json() : null)).catch(() => null);
      if (fresh && fresh.csrf_token) {
        csrfToken = fresh.csrf_token;
        return api(path, body, true);
      }
    }
    throw new ApiError(res.status, data);
  }

  // --- WebAuthn: JSON <-> browser objects; native helpers when present, else a fallback ----
  const webauthnAvailable = () =>
    typeof window.PublicKeyCredential === "function" && !!navigator.credentials;

  // WebAuthn buffers are small (at most a few KiB), so spreading them into arguments is safe.
  const toB64url = (buf) => btoa(String.fromCharCode(...new Uint8Array(buf)))
    .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  const fromB64url = (text) => {
    const b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    const bin = atob(b64 + "===".slice((b64.length + 3) % 4));
    return Uint8Array.from(bin, (c) => c.charCodeAt(0)).buffer;
  };
  const decodeIds = (list) => (list || []).map((c) => ({ ...c, id: fromB64url(c.id) }));

  // Options JSON -> what navigator.credentials takes: PublicKeyCredential.parseCreationOptions-
  // FromJSON / parseRequestOptionsFromJSON where the browser has them, else decoded by hand.
  function parseOptions(json, kind) {
    const opts = json.publicKey || json;
    const parse = PublicKeyCredential[`parse${kind}OptionsFromJSON`];
    if (typeof parse === "function") return parse.call(PublicKeyCredential, opts);
    const out = { ...opts, challenge: fromB64url(opts.challenge) };
    if (opts.user) out.user = { ...opts.user, id: fromB64url(opts.user.id) };
    if (opts.excludeCredentials) out.excludeCredentials = decodeIds(opts.excludeCredentials);
    if (opts.allowCredentials) out.allowCredentials = decodeIds(opts.allowCredentials);
    return out;
  }

  function credentialJSON(cred) {
    if (typeof cred.toJSON === "function") return cred.toJSON();
    const r = cred.response;
    const response = { clientDataJSON: toB64url(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = toB64url(r.attestationObject);
      response.transports = typeof r.getTransports === "function" ? r.getTransports() : [];
    }
    for (const key of ["authenticatorData", "signature", "userHandle"]) {
      if (r[key]) response[key] = toB64url(r[key]);
    }
    const out = { id: cred.id, rawId: toB64url(cred.rawId), type: cred.type, response,
      clientExtensionResults: cred.getClientExtensionResults
        ? cred.getClientExtensionResults() : {} };
    if (cred.authenticatorAttachment) out.authenticatorAttachment = cred.authenticatorAttachment;
    return out;
  }

  // Cancelled, timed out or refused ceremonies, in words a person can act on.
  function ceremonyMessage(err, creating) {
    switch (err && err.name) {
      case "NotAllowedError": case "AbortError":
        return creating ? "The passkey wasn't created (it was cancelled or timed out)."
          : "The passkey check was cancelled or timed out.";
      case "InvalidStateError": return "This device already has a passkey for your account.";
      case "SecurityError":
        return "Passkeys can't be used at this address. Ask your administrator.";
      default: return `Your browser couldn't ${creating ? "create" : "use"} the passkey.`;
    }
  }

  // Runs work() with button disabled; an error's message goes to the status region.
  async function withButton(button, work) {
    button.disabled = true;
    try {
      await work();
      return null;
    } catch (err) {
      say(err.message, "error");
      return err;
    } finally {
      button.disabled = false;
    }
  }

  const readCode = (input) => input.value.replace(/[\s-]/g, "");

  function markInvalid(input) {
    if (!input) return;
    input.setAttribute("aria-invalid", "true");
    input.focus();
    input.select();
  }

  async function copyText(text, done) {
    try {
      await navigator.clipboard.writeText(text);
      say(done, "ok");
    } catch (err) {
      say("Copying isn't allowed here. Select the text and copy it yourself.", "error");
    }
  }

  // --- setup page --------------------------------------------------------------------------
  function setupPage() {
    const totpSection = byId("totp-section");
    const toggle = byId("show-totp");
    const passkeyForm = byId("passkey-form");

    function showTotp(focus) {
      totpSection.hidden = false;
      toggle.setAttribute("aria-expanded", "true");
      if (focus) totpSection.focus();
    }
    toggle.addEventListener("click", () => showTotp(true));
    if (new URLSearchParams(location.search).get("method") === "totp") showTotp(true);

    if (!webauthnAvailable()) {
      byId("passkey-unsupported").hidden = false;
      passkeyForm.hidden = true;
      showTotp(false);
    }

    // After an enrollment: recovery codes (first enrollment only), else straight on.
    function finished(result, what) {
      const codes = Array.isArray(result.recovery_codes) ? result.recovery_codes : [];
      if (codes.length === 0) {
        say(`${what} Taking you back…`, "ok");
        goNext();
        return;
      }
      // Enrolled now: the "MFA is required / access is blocked" notice no longer applies.
      for (const id of ["passkey-section", "totp-section", "setup-footer", "setup-requirement"]) {
        if (byId(id)) byId(id).hidden = true;
      }
      byId("recovery-codes").replaceChildren(...codes.map((code) => {
        const li = document.createElement("li");
        li.textContent = code;
        return li;
      }));
      const step = byId("recovery-step");
      step.hidden = false;
      say(`${what} Now save your recovery codes.`, "ok");
      step.focus();

      const saved = byId("recovery-saved");
      const cont = byId("recovery-continue");
      const warnOnLeave = (ev) => { if (!saved.checked) ev.preventDefault(); };
      window.addEventListener("beforeunload", warnOnLeave);
      byId("recovery-copy").addEventListener("click",
        () => copyText(codes.join("\n"), "Codes copied."));
      byId("recovery-download").addEventListener("click", () => {
        const who = `${main.dataset.appName || "your account"} (${main.dataset.user || ""})`;
        const text = [`Recovery codes for ${who}`,
          "Each code signs you in once if you lose your passkey or authenticator app.",
          "", ...codes, ""].join("\n");
        const a = document.createElement("a");
        a.href = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
        a.download = "recovery-codes.txt";
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(a.href), 10000);
      });
      saved.addEventListener("change", () => { cont.disabled = !saved.checked; });
      byId("recovery-form").addEventListener("submit", (ev) => {
        ev.preventDefault();
        if (!saved.checked) return;
        window.removeEventListener("beforeunload", warnOnLeave);
        goNext();
      });
    }

    passkeyForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const name = byId("passkey-name").value.trim() || "Passkey";
      say("Follow your browser's prompt to create the passkey…");
      withButton(byId("passkey-create"), async () => {
        const options = parseOptions(await api("passkey/begin"), "Creation");
        let cred;
        try {
          cred = await navigator.credentials.create({ publicKey: options });
          if (!cred) throw new DOMException("No credential", "NotAllowedError");
        } catch (err) {
          say(`${ceremonyMessage(err, true)} You can use an authenticator app instead.`, "error");
          showTotp(true);
          return;
        }
        finished(await api("passkey/finish", { credential: credentialJSON(cred), name }),
          "Passkey created.");
      });
    });

    const begin = byId("totp-begin");
    begin.addEventListener("click", () => withButton(begin, async () => {
      const data = await api("totp/begin");
      byId("totp-qr").innerHTML = data.qr_svg; // SVG generated server-side by segno
      byId("totp-secret").textContent = (data.secret.match(/.{1,4}/g) || []).join(" ");
      byId("totp-copy-secret").onclick = () => copyText(data.secret, "Key copied.");
      byId("totp-enroll").hidden = false;
      begin.hidden = true;
      say("Scan the QR code with your app, then enter the 6-digit code it shows.");
    }));

    byId("totp-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const input = byId("totp-code");
      const code = readCode(input);
      if (!/^\d{6}$/.test(code)) {
        say("Enter the 6-digit code from your authenticator app.", "error");
        markInvalid(input);
        return;
      }
      const err = await withButton(byId("totp-submit"), async () => {
        finished(await api("totp/finish", { code }), "Authenticator app turned on.");
      });
      if (err && err.code === "invalid_code") markInvalid(input);
    });
    enableForms();
  }

  // --- verify page -------------------------------------------------------------------------
  function verifyPage() {
    const lockables = () => main.querySelectorAll("[data-lockable]");
    const notice = byId("lockout-notice");
    let unlockTimer = null;

    function lock(untilIso, message) {
      const until = new Date(untilIso);
      const ms = until.getTime() - Date.now();
      if (!(ms > 0)) return;
      for (const el of lockables()) el.disabled = true;
      if (message) {
        const at = until.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
        byId("lockout-text").textContent = `${message} You can try again after ${at}.`;
      }
      notice.hidden = false;
      clearTimeout(unlockTimer);
      unlockTimer = setTimeout(() => {
        for (const el of lockables()) el.disabled = false;
        notice.hidden = true;
        say("You can try again now.");
      }, Math.min(ms + 500, 2147483000));
    }

    async function attempt(run, button, input) {
      const err = await withButton(button, async () => {
        await run();
        say("Verified. Continuing…", "ok");
        goNext();
      });
      if (!err) button.disabled = true; // stay disabled while the next page loads
      else if (err instanceof ApiError && err.status === 429 && err.body.locked_until) {
        lock(err.body.locked_until, err.message);
      } else if (err.code === "invalid_code") markInvalid(input);
    }

    const passkeyButton = byId("passkey-verify-button");
    if (passkeyButton && !webauthnAvailable()) {
      passkeyButton.hidden = true;
      passkeyButton.removeAttribute("data-lockable");
      byId("passkey-verify-unsupported").hidden = false;
      if (!byId("totp-verify-form")) byId("recovery-details").open = true;
    } else if (passkeyButton) {
      passkeyButton.addEventListener("click", () => attempt(async () => {
        say("Follow your browser's prompt to use your passkey…");
        const options = parseOptions(await api("verify/passkey/begin"), "Request");
        let cred;
        try {
          cred = await navigator.credentials.get({ publicKey: options });
          if (!cred) throw new DOMException("No credential", "NotAllowedError");
        } catch (err) {
          throw new ApiError(0, { error: "ceremony", message: ceremonyMessage(err, false) });
        }
        await api("verify/passkey/finish", { credential: credentialJSON(cred) });
      }, passkeyButton, null));
    }

    function codeForm(formId, inputId, path, shape, hint) {
      const form = byId(formId);
      if (!form) return;
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        const input = byId(inputId);
        const code = shape ? readCode(input) : input.value.trim();
        if (!code || (shape && !shape.test(code))) {
          say(hint, "error");
          markInvalid(input);
          return;
        }
        attempt(() => api(path, { code }), form.querySelector("button[type=submit]"), input);
      });
    }
    codeForm("totp-verify-form", "verify-code", "verify/totp", /^\d{6}$/,
      "Enter the 6-digit code from your authenticator app.");
    codeForm("recovery-verify-form", "recovery-code", "verify/recovery", null,
      "Enter one of your recovery codes.");
    enableForms();
    if (main.dataset.lockedUntil) lock(main.dataset.lockedUntil, "");
  }

  if (main.dataset.page === "setup") setupPage();
  else if (main.dataset.page === "verify") verifyPage();
})();

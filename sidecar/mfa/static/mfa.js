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

  // Same check as pages.local_path: only a same-origin relative path, never "//host".
  const localPath = (p) =>
    typeof p === "string" && p.startsWith("/") && !p.startsWith("//") && !p.includes("\\") ? p : "/";
  const nextPath = localPath(main.dataset.nextPath);
  const goNext = () => window.location.assign(nextPath);

  function say(text, kind = "info") {
    if (!statusEl) return;
    statusEl.textContent = text;
    statusEl.dataset.kind = kind;
  }

  class ApiError extends Error {
    constructor(status, body) {
      super(body && typeof body.message === "string" ? body.message
        : `Something went wrong (HTTP ${status}). Please try again.`);
      this.status = status;
      this.code = body && body.error ? String(body.error) : "http_" + status;
      this.body = body || {};
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
    let data = null;
    try { data = await res.json(); } catch (err) { data = null; }
    if (res.ok) return data || {};
    // A stale CSRF token (the session was renewed in another tab): fetch a fresh one, retry once.
    if (res.status === 403 && !retried && data && /csrf/i.test(String(data.error || ""))) {
      try {
        const st = await fetch(`${prefix}/api/status`, { credentials: "same-origin" });
        const fresh = st.ok ? await st.json() : null;
        if (fresh && fresh.csrf_token) {
          csrfToken = fresh.csrf_token;
          return api(path, body, true);
        }
      } catch (err) { /* fall through to the original error */ }
    }
    throw new ApiError(res.status, data);
  }

  // --- WebAuthn: JSON <-> browser objects, native helpers when present ---------------------
  const webauthnAvailable = () =>
    typeof window.PublicKeyCredential === "function" && !!navigator.credentials;

  function toB64url(buf) {
    const bytes = new Uint8Array(buf);
    let bin = "";
    for (let i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function fromB64url(text) {
    const b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    const bin = atob(b64 + "===".slice((b64.length + 3) % 4));
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }

  const decodeIds = (list) => (list || []).map((c) => ({ ...c, id: fromB64url(c.id) }));

  function creationOptions(json) {
    const opts = json.publicKey || json;
    const PKC = window.PublicKeyCredential;
    if (typeof PKC.parseCreationOptionsFromJSON === "function") {
      return PKC.parseCreationOptionsFromJSON(opts);
    }
    return { ...opts, challenge: fromB64url(opts.challenge),
      user: { ...opts.user, id: fromB64url(opts.user.id) },
      excludeCredentials: decodeIds(opts.excludeCredentials) };
  }

  function requestOptions(json) {
    const opts = json.publicKey || json;
    const PKC = window.PublicKeyCredential;
    if (typeof PKC.parseRequestOptionsFromJSON === "function") {
      return PKC.parseRequestOptionsFromJSON(opts);
    }
    return { ...opts, challenge: fromB64url(opts.challenge),
      allowCredentials: decodeIds(opts.allowCredentials) };
  }

  function credentialJSON(cred) {
    if (typeof cred.toJSON === "function") {
      try { return cred.toJSON(); } catch (err) { /* use the fallback below */ }
    }
    const r = cred.response;
    const response = { clientDataJSON: toB64url(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = toB64url(r.attestationObject);
      response.transports = typeof r.getTransports === "function" ? r.getTransports() : [];
    }
    if (r.authenticatorData) response.authenticatorData = toB64url(r.authenticatorData);
    if (r.signature) response.signature = toB64url(r.signature);
    if (r.userHandle) response.userHandle = toB64url(r.userHandle);
    const out = { id: cred.id, rawId: toB64url(cred.rawId), type: cred.type, response,
      clientExtensionResults: typeof cred.getClientExtensionResults === "function"
        ? cred.getClientExtensionResults() : {} };
    if (cred.authenticatorAttachment) out.authenticatorAttachment = cred.authenticatorAttachment;
    return out;
  }

  function ceremonyMessage(err, creating) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "AbortError") {
      return creating ? "The passkey wasn't created (it was cancelled or timed out)."
        : "The passkey check was cancelled or timed out.";
    }
    if (name === "InvalidStateError") {
      return "This device already has a passkey for your account. Try another device, or use an authenticator app.";
    }
    if (name === "SecurityError") return "This site can't use passkeys at this address. Ask your administrator.";
    return creating ? "Your browser couldn't create a passkey." : "Your browser couldn't use the passkey.";
  }

  function busy(el, on) {
    if (el) el.disabled = on;
    main.setAttribute("aria-busy", on ? "true" : "false");
  }

  const readCode = (input) => input.value.replace(/[\s-]/g, "");

  function markInvalid(input, on) {
    if (!input) return;
    if (on) { input.setAttribute("aria-invalid", "true"); input.focus(); input.select(); }
    else input.removeAttribute("aria-invalid");
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
    let savedCodes = false;

    function showTotp(focus) {
      totpSection.hidden = false;
      toggle.setAttribute("aria-expanded", "true");
      if (focus) totpSection.focus();
    }

    toggle.addEventListener("click", () => showTotp(true));

    if (!webauthnAvailable()) {
      byId("passkey-unsupported").hidden = false;
      passkeyForm.hidden = true;
      showTotp(false);
    }

    function finished(result, what) {
      const codes = result && Array.isArray(result.recovery_codes) ? result.recovery_codes : null;
      if (!codes || codes.length === 0) {
        say(`${what} Taking you back…`, "ok");
        goNext();
        return;
      }
      for (const id of ["passkey-section", "totp-section", "setup-footer"]) {
        const el = byId(id);
        if (el) el.hidden = true;
      }
      const list = byId("recovery-codes");
      list.replaceChildren(...codes.map((code) => {
        const li = document.createElement("li");
        li.textContent = code;
        return li;
      }));
      const step = byId("recovery-step");
      step.hidden = false;
      say(`${what} Now save your recovery codes.`, "ok");
      step.focus();
      window.addEventListener("beforeunload", (ev) => {
        if (!savedCodes) ev.preventDefault();
      });
      const text = () => [
        `Recovery codes for ${main.dataset.appName || "your account"} (${main.dataset.user || ""})`,
        "Each code can be used once to sign in if you lose your passkey or authenticator app.",
        "", ...codes, ""].join("\n");
      byId("recovery-copy").addEventListener("click", () => copyText(codes.join("\n"), "Codes copied."));
      byId("recovery-download").addEventListener("click", () => {
        const url = URL.createObjectURL(new Blob([text()], { type: "text/plain" }));
        const a = document.createElement("a");
        a.href = url;
        a.download = "recovery-codes.txt";
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      });
      const saved = byId("recovery-saved");
      const cont = byId("recovery-continue");
      saved.addEventListener("change", () => { cont.disabled = !saved.checked; });
      byId("recovery-form").addEventListener("submit", (ev) => {
        ev.preventDefault();
        if (!saved.checked) return;
        savedCodes = true;
        goNext();
      });
    }

    passkeyForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const button = byId("passkey-create");
      const name = byId("passkey-name").value.trim() || "Passkey";
      busy(button, true);
      say("Follow your browser's prompt to create the passkey…");
      try {
        const options = creationOptions(await api("passkey/begin"));
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
      } catch (err) {
        say(err.message, "error");
      } finally {
        busy(button, false);
      }
    });

    byId("totp-begin").addEventListener("click", async (ev) => {
      const button = ev.currentTarget;
      busy(button, true);
      try {
        const data = await api("totp/begin");
        byId("totp-qr").innerHTML = data.qr_svg; // server-generated SVG (segno)
        byId("totp-secret").textContent = (data.secret.match(/.{1,4}/g) || []).join(" ");
        byId("totp-copy-secret").onclick = () => copyText(data.secret, "Key copied.");
        byId("totp-enroll").hidden = false;
        button.hidden = true;
        say("Scan the QR code with your app, then enter the 6-digit code it shows.");
      } catch (err) {
        say(err.message, "error");
      } finally {
        busy(button, false);
      }
    });

    byId("totp-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const input = byId("totp-code");
      const code = readCode(input);
      if (!/^\d{6}$/.test(code)) {
        say("Enter the 6-digit code from your authenticator app.", "error");
        markInvalid(input, true);
        return;
      }
      const button = byId("totp-submit");
      busy(button, true);
      try {
        const result = await api("totp/finish", { code });
        markInvalid(input, false);
        finished(result, "Authenticator app turned on.");
      } catch (err) {
        say(err.message, "error");
        if (err.code === "invalid_code") markInvalid(input, true);
      } finally {
        busy(button, false);
      }
    });
  }

  // --- verify page -------------------------------------------------------------------------
  function verifyPage() {
    const lockables = () => main.querySelectorAll("[data-lockable]");
    let unlockTimer = null;

    function lock(untilIso, message) {
      const until = new Date(untilIso);
      const ms = until.getTime() - Date.now();
      if (!(ms > 0)) return;
      for (const el of lockables()) el.disabled = true;
      const at = until.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      if (message) byId("lockout-text").textContent = `${message} You can try again after ${at}.`;
      byId("lockout-notice").hidden = false;
      clearTimeout(unlockTimer);
      unlockTimer = setTimeout(() => {
        for (const el of lockables()) el.disabled = false;
        byId("lockout-notice").hidden = true;
        say("You can try again now.");
      }, Math.min(ms + 500, 2147483000));
    }

    if (main.dataset.lockedUntil) lock(main.dataset.lockedUntil, "");

    async function attempt(run, button, input) {
      busy(button, true);
      try {
        await run();
        say("Verified. Continuing…", "ok");
        goNext();
        return; // stay disabled while the next page loads
      } catch (err) {
        busy(button, false);
        say(err.message, "error");
        if (err instanceof ApiError && err.status === 429 && err.body.locked_until) {
          lock(err.body.locked_until, err.message);
        } else if (err.code === "invalid_code") {
          markInvalid(input, true);
        }
      }
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
        const options = requestOptions(await api("verify/passkey/begin"));
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

    function codeForm(formId, inputId, path, check, hint) {
      const form = byId(formId);
      if (!form) return;
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        const input = byId(inputId);
        const code = check ? readCode(input) : input.value.trim();
        if (!code || (check && !check.test(code))) {
          say(hint, "error");
          markInvalid(input, true);
          return;
        }
        attempt(() => api(path, { code }), form.querySelector("button[type=submit]"), input);
      });
    }

    codeForm("totp-verify-form", "verify-code", "verify/totp", /^\d{6}$/,
      "Enter the 6-digit code from your authenticator app.");
    codeForm("recovery-verify-form", "recovery-code", "verify/recovery", null,
      "Enter one of your recovery codes.");
  }

  if (main.dataset.page === "setup") setupPage();
  else if (main.dataset.page === "verify") verifyPage();
})();

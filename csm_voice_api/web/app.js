// Voice-cloning UI: plain JS, no framework, no build step. Talks only to this server's /v1 routes.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "csm-voice-api.api-key";
  // Paths are relative to the page so the UI keeps working behind a reverse proxy's path prefix.
  const ROUTES = {
    clone: "v1/voice-cloning/clone",
    voices: "v1/voice-cloning/voices",
    generate: "v1/voice-cloning/generate",
    builtins: "v1/audio/voices",
    speech: "v1/audio/speech",
  };

  const state = {
    library: [], // cloned voices, as the API returns them
    builtins: [], // [{id, name}] from /v1/audio/voices
    lastCreated: null,
    voicePicked: false, // the user chose a voice in Generate Speech (or via Use)
  };

  // ---------------------------------------------------------------------------------------
  // API access: every failure becomes an Error whose message is fit to show the user.

  async function api(path, { method = "GET", json, form, expect = "json" } = {}) {
    const headers = {};
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form) {
      body = form;
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body });
    } catch {
      throw new Error("Could not reach the server. Check that it is running and try again.");
    }
    if (res.status === 401) $("api-key-settings").open = true; // show where the key goes
    if (!res.ok) throw new Error(await errorMessage(res));
    if (expect === "blob") return res.blob();
    if (expect === "none" || res.status === 204) return null;
    return res.json();
  }

  async function errorMessage(res) {
    let text = "";
    try {
      text = await res.text();
    } catch {
      // the body is gone; fall through to the status line
    }
    try {
      const body = JSON.parse(text);
      const message = body?.error?.message ?? (typeof body?.detail === "string" ? body.detail : null);
      if (message) return message;
    } catch {
      // not JSON: fall through
    }
    if (res.status === 401) return "The server needs an API key: enter it under “API key” at the top of the page.";
    if (res.status === 413) return "The upload is larger than the server accepts.";
    return `The server answered ${res.status} ${res.statusText}.`.replace(" .", ".");
  }

  const voiceId = (v) => v.voice_id ?? v.id;
  const asList = (body) => (Array.isArray(body) ? body : body?.voices ?? body?.data ?? []);

  // ---------------------------------------------------------------------------------------
  // Small view helpers.

  function showError(el, message) {
    el.textContent = message;
    el.hidden = !message;
  }

  function setBusy(button, statusEl, busy, message = "") {
    button.disabled = busy;
    button.setAttribute("aria-busy", String(busy));
    statusEl.textContent = message;
  }

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k in node) node[k] = v;
      else node.setAttribute(k, v);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function formatDuration(seconds) {
    if (typeof seconds !== "number" || !Number.isFinite(seconds)) return null;
    return `${seconds.toFixed(1)} s`;
  }

  function formatDate(createdAt) {
    if (createdAt === undefined || createdAt === null) return null;
    // Unix seconds or an ISO string: both are common in this API family.
    const date = typeof createdAt === "number" ? new Date(createdAt * 1000) : new Date(createdAt);
    return Number.isNaN(date.getTime()) ? null : date.toLocaleString();
  }

  function slug(text) {
    return (text || "speech").toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "") || "speech";
  }

  // One object URL per slot: revoking the old one when a slot is refilled keeps memory flat.
  const objectUrls = new Map();
  function objectUrl(slot, blob) {
    if (objectUrls.has(slot)) URL.revokeObjectURL(objectUrls.get(slot));
    const url = URL.createObjectURL(blob);
    objectUrls.set(slot, url);
    return url;
  }

  // ---------------------------------------------------------------------------------------
  // Tabs (WAI-ARIA tabs pattern: arrows, Home and End move between tabs).

  const TABS = ["clone", "voices", "generate"];

  function selectTab(name, { focus = false, refresh = true } = {}) {
    for (const t of TABS) {
      const tab = $(`tab-${t}`);
      const active = t === name;
      tab.setAttribute("aria-selected", String(active));
      tab.tabIndex = active ? 0 : -1;
      $(`panel-${t}`).hidden = !active;
      if (active && focus) tab.focus();
    }
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
    if (name === "voices" && refresh) loadVoices();
  }

  function initTabs() {
    for (const t of TABS) {
      const tab = $(`tab-${t}`);
      tab.addEventListener("click", () => selectTab(t));
      tab.addEventListener("keydown", (e) => {
        const i = TABS.indexOf(t);
        const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: TABS.length - 1 }[e.key];
        if (next === undefined) return;
        e.preventDefault();
        selectTab(TABS[(next + TABS.length) % TABS.length], { focus: true });
      });
    }
    document.querySelectorAll("[data-tab]").forEach((a) =>
      a.addEventListener("click", (e) => {
        e.preventDefault();
        selectTab(a.dataset.tab, { focus: true });
      }),
    );
    const fromHash = location.hash.slice(1);
    selectTab(TABS.includes(fromHash) ? fromHash : "clone", { refresh: false });
    // Links and the back button may change the hash: follow it.
    window.addEventListener("hashchange", () => {
      const name = location.hash.slice(1);
      if (TABS.includes(name)) selectTab(name);
    });
  }

  // ---------------------------------------------------------------------------------------
  // Clone Voice.

  function initClone() {
    const file = $("clone-file");
    const preview = $("clone-file-preview");
    file.addEventListener("change", () => {
      const chosen = file.files[0];
      preview.hidden = !chosen;
      if (chosen) preview.src = objectUrl("clone-preview", chosen);
      if (chosen && !$("clone-name").value) $("clone-name").value = chosen.name.replace(/\.[^.]+$/, "").slice(0, 64);
    });
    $("clone-form").addEventListener("submit", onClone);
    $("clone-another").addEventListener("click", () => {
      $("clone-result").hidden = true;
      $("clone-name").focus();
    });
    $("clone-use").addEventListener("click", () => {
      if (state.lastCreated) {
        $("gen-voice").value = voiceId(state.lastCreated);
        state.voicePicked = true;
      }
      selectTab("generate", { focus: true });
      $("gen-text").focus();
    });
  }

  async function onClone(event) {
    event.preventDefault();
    const button = $("clone-submit");
    const status = $("clone-status");
    const error = $("clone-error");
    const chosen = $("clone-file").files[0];
    const name = $("clone-name").value.trim();
    showError(error, "");
    if (!chosen) return showError(error, "Choose an audio file to clone the voice from.");
    if (!name) return showError(error, "Give the voice a name.");

    const form = new FormData();
    form.append("name", name);
    form.append("audio_file", chosen, chosen.name);
    form.append("transcript", $("clone-transcript").value.trim());
    form.append("description", $("clone-description").value.trim());
    setBusy(button, status, true, "Cloning… the clip is being analysed.");
    try {
      const voice = await api(ROUTES.clone, { method: "POST", form });
      state.lastCreated = voice;
      renderCreated(voice);
      $("clone-form").reset();
      $("clone-file-preview").hidden = true;
      status.textContent = `Created “${voice.name ?? name}”.`;
      await refreshLibrary();
    } catch (e) {
      status.textContent = "";
      showError(error, e.message);
    } finally {
      setBusy(button, status, false, status.textContent);
    }
  }

  function renderCreated(voice) {
    const meta = $("clone-result-meta");
    const rows = [
      ["Name", voice.name],
      ["Voice ID", voiceId(voice)],
      ["Duration", formatDuration(voice.duration_s ?? voice.duration_seconds)],
      ["Description", voice.description],
      ["Transcript", voice.transcript],
    ];
    meta.replaceChildren();
    for (const [label, value] of rows) {
      if (!value) continue;
      meta.append(el("dt", { textContent: label }), el("dd", { textContent: String(value) }));
    }
    const notice = $("clone-result-notice");
    const warnings = [].concat(voice.warnings ?? voice.warning ?? []);
    if (!voice.transcript && !warnings.length) {
      warnings.push("No transcript was given: the clone works, but a transcript makes it closer.");
    }
    notice.textContent = warnings.join(" ");
    notice.hidden = !warnings.length;
    $("clone-result").hidden = false;
  }

  // ---------------------------------------------------------------------------------------
  // My Voices.

  async function refreshLibrary() {
    const body = await api(ROUTES.voices);
    state.library = asList(body).filter((v) => !v.builtin);
    renderVoiceList();
    renderVoiceSelect();
  }

  async function loadVoices() {
    const list = $("voice-list");
    const status = $("voices-status");
    list.setAttribute("aria-busy", "true");
    status.textContent = "Loading…";
    try {
      await refreshLibrary();
      showError($("voices-error"), "");
      status.textContent = "";
    } catch (e) {
      status.textContent = "";
      showError($("voices-error"), e.message);
    } finally {
      list.setAttribute("aria-busy", "false");
    }
  }

  function initVoices() {
    $("voices-refresh").addEventListener("click", loadVoices);
  }

  // Items are kept across refreshes while their voice is unchanged, so a refresh never cuts off
  // a preview that is loading or playing, or a delete being confirmed.
  const items = new Map(); // voice id -> {key, node}

  function renderVoiceList() {
    const list = $("voice-list");
    const nodes = state.library.map((voice) => {
      const key = JSON.stringify(voice);
      const kept = items.get(voiceId(voice));
      if (kept && kept.key === key) return kept.node;
      const node = voiceItem(voice);
      items.set(voiceId(voice), { key, node });
      return node;
    });
    const present = new Set(state.library.map(voiceId));
    for (const id of [...items.keys()]) if (!present.has(id)) items.delete(id);
    // Touch the DOM only on a change: re-inserting nodes would cancel a click in progress.
    const same = nodes.length === list.children.length && nodes.every((n, i) => list.children[i] === n);
    if (!same) list.replaceChildren(...nodes);
    $("voices-empty").hidden = state.library.length > 0;
  }

  function voiceItem(voice) {
    const id = voiceId(voice);
    const facts = [formatDuration(voice.duration_s ?? voice.duration_seconds), formatDate(voice.created_at)];
    const audio = el("audio", { class: "audio", controls: true, hidden: true, "aria-label": `Preview of ${voice.name}` });
    const actions = el("div", { class: "actions" });
    const item = el(
      "li",
      { class: "voice", dataset: { voiceId: id } },
      el("div", { class: "voice-head" },
        el("h3", { textContent: voice.name }),
        el("code", { class: "voice-id", textContent: id })),
      voice.description ? el("p", { class: "voice-desc", textContent: voice.description }) : null,
      el("p", { class: "voice-facts", textContent: facts.filter(Boolean).join(" · ") }),
      actions,
      audio,
      el("p", { class: "error", role: "alert", hidden: true }),
    );
    renderActions(item, voice, actions, audio);
    return item;
  }

  function renderActions(item, voice, actions, audio) {
    const error = item.querySelector(".error");
    const preview = el("button", { type: "button", textContent: "Preview", "aria-label": `Preview ${voice.name}` });
    const use = el("button", { type: "button", textContent: "Use", "aria-label": `Generate speech with ${voice.name}` });
    const del = el("button", { type: "button", class: "danger", textContent: "Delete", "aria-label": `Delete ${voice.name}` });
    preview.addEventListener("click", async () => {
      showError(error, "");
      preview.disabled = true;
      preview.textContent = "Generating…";
      try {
        const blob = await api(`${ROUTES.voices}/${encodeURIComponent(voiceId(voice))}/preview`, { method: "POST", expect: "blob" });
        audio.src = objectUrl(`preview-${voiceId(voice)}`, blob);
        audio.hidden = false;
        audio.play().catch(() => {}); // autoplay may be refused; the controls are there
      } catch (e) {
        showError(error, e.message);
      } finally {
        preview.disabled = false;
        preview.textContent = "Preview";
      }
    });
    use.addEventListener("click", () => {
      $("gen-voice").value = voiceId(voice);
      state.voicePicked = true;
      selectTab("generate", { focus: true });
    });
    del.addEventListener("click", () => confirmDelete(item, voice, actions, audio));
    actions.replaceChildren(preview, use, del);
  }

  // Inline confirmation: no blocking window.confirm, and the choice stays next to the voice.
  function confirmDelete(item, voice, actions, audio) {
    const yes = el("button", { type: "button", class: "danger", textContent: "Delete", "aria-label": `Confirm deleting ${voice.name}` });
    const no = el("button", { type: "button", textContent: "Keep" });
    const question = el("span", { class: "confirm", textContent: `Delete “${voice.name}” for good?` });
    no.addEventListener("click", () => renderActions(item, voice, actions, audio));
    yes.addEventListener("click", async () => {
      yes.disabled = no.disabled = true;
      try {
        await api(`${ROUTES.voices}/${encodeURIComponent(voiceId(voice))}`, { method: "DELETE", expect: "none" });
        $("voices-status").textContent = `Deleted “${voice.name}”.`;
        await refreshLibrary();
      } catch (e) {
        showError(item.querySelector(".error"), e.message);
        renderActions(item, voice, actions, audio);
      }
    });
    actions.replaceChildren(question, yes, no);
    no.focus();
  }

  // ---------------------------------------------------------------------------------------
  // Generate Speech.

  async function loadBuiltins() {
    try {
      const body = await api(ROUTES.builtins);
      state.builtins = asList(body).map((v) => ({ id: v.id, name: v.name ?? v.id }));
    } catch (e) {
      showError($("gen-error"), `Could not load the built-in voices: ${e.message}`);
    }
    renderVoiceSelect();
  }

  function renderVoiceSelect() {
    const select = $("gen-voice");
    const previous = select.value;
    const mine = new Set(state.library.map(voiceId));
    const groups = [];
    if (state.library.length) {
      groups.push(el("optgroup", { label: "My voices" },
        ...state.library.map((v) => el("option", { value: voiceId(v), textContent: v.name }))));
    }
    const builtins = state.builtins.filter((v) => !mine.has(v.id));
    if (builtins.length) {
      groups.push(el("optgroup", { label: "Built-in voices" },
        ...builtins.map((v) => el("option", { value: v.id, textContent: v.name }))));
    }
    select.replaceChildren(...groups);
    // Keep a voice the user chose; otherwise default to the first (their own voices come first).
    const keep = state.voicePicked && [...select.options].some((o) => o.value === previous);
    select.value = keep ? previous : select.options[0]?.value ?? "";
  }

  function initGenerate() {
    const text = $("gen-text");
    const count = $("gen-text-count");
    const temp = $("gen-temperature");
    const tempOut = $("gen-temperature-value");
    text.addEventListener("input", () => (count.textContent = `${text.value.length} / 4096 characters`));
    temp.addEventListener("input", () => (tempOut.value = Number(temp.value).toFixed(2)));
    $("gen-voice").addEventListener("change", () => (state.voicePicked = true));
    $("generate-form").addEventListener("submit", onGenerate);
  }

  async function onGenerate(event) {
    event.preventDefault();
    const button = $("gen-submit");
    const status = $("gen-status");
    const error = $("gen-error");
    const voice = $("gen-voice").value;
    const text = $("gen-text").value.trim();
    const temperature = Number($("gen-temperature").value);
    showError(error, "");
    if (!voice) return showError(error, "Choose a voice (clone one first, or pick a built-in voice).");
    if (!text) return showError(error, "Type the text to speak.");

    const cloned = state.library.find((v) => voiceId(v) === voice);
    const started = performance.now();
    setBusy(button, status, true, "Generating…");
    try {
      // Cloned voices use the voice-cloning route; built-ins the OpenAI speech route.
      const blob = cloned
        ? await api(ROUTES.generate, { method: "POST", expect: "blob", json: { voice_id: voice, text, temperature } })
        : await api(ROUTES.speech, {
            method: "POST",
            expect: "blob",
            json: { model: "csm-1b", input: text, voice, response_format: "wav", temperature, stream: false },
          });
      showResult(blob, cloned?.name ?? voice, (performance.now() - started) / 1000);
    } catch (e) {
      status.textContent = "";
      showError(error, e.message);
    } finally {
      setBusy(button, status, false, status.textContent);
    }
  }

  function showResult(blob, voiceName, seconds) {
    const wav = blob.type ? blob : new Blob([blob], { type: "audio/wav" });
    const url = objectUrl("generated", wav);
    const audio = $("gen-audio");
    const link = $("gen-download");
    audio.src = url;
    link.href = url;
    link.download = `${slug(voiceName)}-${new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-")}.wav`;
    $("gen-result").hidden = false;
    $("gen-status").textContent = `Done in ${seconds.toFixed(1)} s.`;
    audio.addEventListener(
      "loadedmetadata",
      () => ($("gen-status").textContent = `Done in ${seconds.toFixed(1)} s: ${audio.duration.toFixed(1)} s of audio.`),
      { once: true },
    );
  }

  // ---------------------------------------------------------------------------------------

  function initApiKey() {
    const input = $("api-key");
    input.value = localStorage.getItem(KEY_STORAGE) ?? "";
    input.addEventListener("change", () => {
      const key = input.value.trim();
      if (key) localStorage.setItem(KEY_STORAGE, key);
      else localStorage.removeItem(KEY_STORAGE);
      loadBuiltins();
      loadVoices();
    });
  }

  function init() {
    initApiKey();
    initTabs();
    initClone();
    initVoices();
    initGenerate();
    loadBuiltins();
    loadVoices();
  }

  init();
})();

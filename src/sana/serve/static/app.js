"use strict";
// The Sana web page: reads the model's defaults from /health, posts to /v1/images/generations, polls
// /v1/progress/{id} for sampling steps, and shows the PNGs (their exact bytes: downloads keep the metadata).

const $ = (id) => document.getElementById(id);
const state = { settings: null, busy: false };
window.sanaProgressLog = []; // every progress answer seen, for tests and debugging

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function waitForModel() {
  for (;;) {
    try {
      const r = await fetch("/health", { cache: "no-store" });
      const body = await r.json();
      if (r.ok) return body;
      if (body.status === "failed") { setStatus("The model failed to load: " + body.error, true); return null; }
      setStatus("The model is " + body.status + "…");
    } catch (e) {
      setStatus("Cannot reach the server; retrying…", true);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function applySettings(s) {
  state.settings = s;
  $("model").textContent = s.model + " · " + s.sampler;
  for (const id of ["width", "height"]) { $(id).value = s.default_size; $(id).max = s.max_side; }
  $("steps").value = s.steps; $("steps").max = s.max_steps;
  $("guidance").value = s.guidance; $("guidance").max = s.max_guidance;
  $("n").max = s.max_images;
  if (s.api_key_required) {
    $("apikey-row").hidden = false;
    $("apikey").value = localStorage.getItem("sana-api-key") || "";
  }
  $("generate").disabled = false;
  setStatus("Ready.");
}

function randomId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Math.random().toString(36).slice(2) + Date.now().toString(36);
}

function showProgress(p) {
  window.sanaProgressLog.push(p);
  const bar = $("progress");
  if (p.state === "queued") {
    bar.removeAttribute("value");
    setStatus(p.queue_position ? `Queued (${p.queue_position} ahead)…` : "Queued…");
  } else if (p.state === "running") {
    bar.max = p.steps; bar.value = p.step;
    const images = p.images_done > 0 ? ` · ${p.images_done} of ${p.n} images done` : "";
    setStatus(p.step >= p.steps ? "Decoding…" : `Step ${p.step} of ${p.steps}${images}`);
  }
}

function pngBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function addToGallery(answer) {
  const gallery = $("gallery");
  for (const item of answer.data.slice().reverse()) {
    const url = URL.createObjectURL(pngBlob(item.b64_json));
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url; img.alt = item.revised_prompt;
    img.dataset.seed = item.seed;
    const caption = document.createElement("figcaption");
    const text = document.createElement("span");
    text.textContent = `${item.revised_prompt} — seed ${item.seed}, ${answer.size}, ${answer.steps} steps, ` +
      `guidance ${answer.guidance} `;
    caption.append(text);
    if (answer.flagged) {
      const flag = document.createElement("span");
      flag.className = "flag";
      flag.textContent = "(the prompt was replaced by the safety check) ";
      caption.append(flag);
    }
    const link = document.createElement("a");
    link.href = url; link.download = `sana-${item.seed}.png`; link.textContent = "Download PNG";
    link.className = "download";
    caption.append(link);
    figure.append(img, caption);
    gallery.prepend(figure);
  }
}

async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  const num = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value,
    size: `${num("width")}x${num("height")}`,
    steps: num("steps"),
    guidance: num("guidance"),
    n: num("n"),
    response_format: "b64_json",
    progress_id: randomId(),
  };
  if ($("negative").value.trim()) body.negative_prompt = $("negative").value;
  if ($("seed").value !== "") body.seed = num("seed");
  if ($("apikey").value.trim()) localStorage.setItem("sana-api-key", $("apikey").value.trim());

  state.busy = true;
  $("generate").disabled = true;
  setStatus("Sending…");
  const started = performance.now();
  let polling = true;
  const poll = async () => {
    while (polling) {
      try {
        const r = await fetch(`/v1/progress/${body.progress_id}`, { headers: headers(), cache: "no-store" });
        if (r.ok && polling) showProgress(await r.json());
      } catch (e) { /* the generation request reports errors */ }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  };
  poll();
  try {
    const r = await fetch("/v1/images/generations", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    const answer = await r.json().catch(() => ({ error: { message: `HTTP ${r.status}` } }));
    polling = false;
    if (!r.ok) {
      const retry = r.headers.get("Retry-After");
      setStatus(`Error ${r.status}: ${answer.error ? answer.error.message : r.statusText}` +
        (retry ? ` (retry in ${retry} s)` : ""), true);
      return;
    }
    addToGallery(answer);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $("progress").max = 1; $("progress").value = 1;
    setStatus(`Done in ${seconds} s.` + (answer.flagged ? " The prompt was replaced by the safety check." : ""));
  } catch (e) {
    setStatus("The request failed: " + e, true);
  } finally {
    polling = false;
    state.busy = false;
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
waitForModel().then((settings) => { if (settings) applySettings(settings); });

// tritonsd's page: txt2img, img2img / inpainting and PNG info over the server's A1111 routes; live progress and
// previews from /sdapi/v1/progress; checkpoint, VAE, LoRA and embedding pickers from the listing routes; results
// in gallery.js, the inpainting mask in mask.js. No build step, nothing from outside the server.
"use strict";

const $ = (id) => document.getElementById(id);
const API = "/sdapi/v1";
const COMMON = ["prompt", "negative_prompt", "width", "height", "steps", "sampler_name", "scheduler", "cfg_scale",
                "seed", "batch_size"];
const NUMBERS = new Set(["width", "height", "steps", "cfg_scale", "seed", "batch_size", "hr_scale",
                         "hr_second_pass_steps", "denoising_strength", "hr_resize_x", "hr_resize_y"]);
// hires fix (webui's UI defaults: Latent, 2x, the first pass's steps, strength 0.7), sent when its box is ticked
const HIRES = ["hr_upscaler", "hr_scale", "hr_second_pass_steps", "denoising_strength", "hr_resize_x", "hr_resize_y"];
const STATUS_WORDS = { 400: "The request was not valid", 401: "Not signed in", 404: "Not found",
  408: "The request took too long", 413: "Too large for this server", 422: "The server cannot do this",
  429: "Too many requests", 499: "Cancelled", 500: "The server failed", 503: "The server is busy" };

const page = { mode: "txt2img", running: false, polling: null, init: null, png: null, lastRequest: null,
               overrides: {}, options: {} };
const mask = new MaskEditor($("mask-canvas"), () => { $("use_mask").checked = true; });
const gallery = new Gallery($("gallery"), $("viewer"), (settings) => setForm(settings));

// ---------------------------------------------------------------- talking to the server

class ServerError extends Error {}

// The server's JSON error body in words: A1111's {error, detail, errors} (detail a string, or FastAPI's list).
function errorText(status, body) {
  const head = STATUS_WORDS[status] || `Error ${status}`;
  if (!body || typeof body !== "object") return head + ".";
  let detail = body.detail;
  if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  detail = detail || body.errors || body.error;
  return detail ? `${head}: ${detail}` : head + ".";
}

async function getJSON(path, options) {
  let response;
  try {
    response = await fetch(API + path, options);
  } catch (e) {
    throw new ServerError("The server did not answer: is it still running?");
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ServerError(errorText(response.status, body));
  return body;
}

const postJSON = (path, body) => getJSON(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

function showError(e) {
  $("error").textContent = e ? String(e.message || e) : "";
}

// ---------------------------------------------------------------- choices and pickers

function fill(select, items, value) {
  select.replaceChildren(...items.map(([v, label]) => new Option(label, v, false, v === value)));
}

async function loadChoices() {
  const [samplers, schedulers, options, modes, upscalers] = await Promise.all([
    getJSON("/samplers"), getJSON("/schedulers"), getJSON("/options"), getJSON("/latent-upscale-modes"),
    getJSON("/upscalers")]);
  fill($("sampler_name"), samplers.map((s) => [s.name, s.name]), "DPM++ 2M");
  fill($("scheduler"), schedulers.map((s) => [s.label, s.label]), "Automatic");
  fill($("hr_upscaler"), [...modes, ...upscalers].map((u) => [u.name, u.name]), "Latent");
  const every = options.show_progress_every_n_steps;
  page.options = options;
  if (Number.isInteger(every)) $("preview_every").value = Math.max(every, 0);
  if (typeof options.live_previews_enable === "boolean") $("live_previews_enable").checked = options.live_previews_enable;
  await Promise.all([loadModels(options), loadNetworks()]);
}

async function loadModels(options) {
  const [models, vaes] = await Promise.all([getJSON("/sd-models"), getJSON("/sd-vae")]);
  fill($("sd_model_checkpoint"), models.map((m) => [m.title, m.title]), options.sd_model_checkpoint);
  fill($("sd_vae"), [["Automatic", "Automatic"], ...vaes.map((v) => [v.model_name, v.model_name])],
       options.sd_vae || "Automatic");
  $("sd_vae").closest("label").hidden = vaes.length === 0;
}

async function loadNetworks() {
  const [loras, embeddings] = await Promise.all([getJSON("/loras"), getJSON("/embeddings")]);
  const keep = (select, names) => select.replaceChildren(select.options[0], ...names.map((n) => new Option(n, n)));
  keep($("lora-picker"), loras.map((l) => l.name));
  keep($("embedding-picker"), Object.keys(embeddings.loaded || {}));
}

// A1111's extra networks: the text added to the prompt after a space (extra_networks_add_text_separator).
function insertIntoPrompt(text) {
  const prompt = $("prompt");
  prompt.value = prompt.value.trim() ? `${prompt.value.replace(/\s+$/, "")} ${text}` : text;
  prompt.dispatchEvent(new Event("input"));
}

async function switchModel(options, what) {
  const pickers = [$("sd_model_checkpoint"), $("sd_vae")];
  pickers.forEach((p) => { p.disabled = true; });
  $("generate").disabled = true;
  $("model-status").textContent = `Loading ${what}…`;
  const timer = setInterval(async () => {
    const p = await getJSON("/progress?skip_current_image=true").catch(() => null);
    if (p && p.textinfo) $("model-status").textContent = `${p.textinfo}: ${what}…`;
  }, 300);
  try {
    await postJSON("/options", options);
    $("model-status").textContent = `Loaded ${what}`;
  } catch (e) {
    $("model-status").textContent = "";
    showError(e);
    const current = await getJSON("/options").catch(() => null);
    if (current) loadModels(current).catch(() => {});
  } finally {
    clearInterval(timer);
    pickers.forEach((p) => { p.disabled = false; });
    $("generate").disabled = page.running;
  }
}

// ---------------------------------------------------------------- tabs

function setMode(mode) {
  page.mode = mode;
  for (const name of ["txt2img", "img2img", "pnginfo"]) {
    $(`tab-${name}`).setAttribute("aria-selected", String(name === mode));
  }
  $("controls").hidden = mode === "pnginfo";
  $("pnginfo").hidden = mode !== "pnginfo";
  if (mode !== "pnginfo") $("controls").dataset.mode = mode;
}

// ---------------------------------------------------------------- the form

function number(id) { return Number($(id).value); }

function request() {
  const body = {};
  for (const name of COMMON) body[name] = NUMBERS.has(name) ? number(name) : $(name).value;
  const overrides = { ...page.overrides };
  if (number("clip_skip") !== 1) overrides.CLIP_stop_at_last_layers = number("clip_skip");
  if (Object.keys(overrides).length) body.override_settings = overrides;
  if (page.mode === "txt2img") {
    if ($("enable_hr").checked) {
      body.enable_hr = true;
      for (const name of HIRES) body[name] = NUMBERS.has(name) ? number(name) : $(name).value;
    }
    return body;
  }
  if (!page.init) throw new Error("Choose an image for img2img first (or drop one on the image box).");
  body.init_images = [page.init];
  body.denoising_strength = number("i2i_denoising_strength");
  body.resize_mode = number("resize_mode");
  if ($("use_mask").checked) {
    if (mask.isEmpty()) throw new Error("The mask is empty: paint the area to repaint, or untick Inpaint.");
    Object.assign(body, {
      mask: mask.toDataURL(), mask_blur: number("mask_blur"), inpainting_fill: number("inpainting_fill"),
      inpaint_full_res: $("inpaint_full_res").value === "1",
      inpaint_full_res_padding: number("inpaint_full_res_padding"),
      inpainting_mask_invert: number("inpainting_mask_invert") });
  }
  return body;
}

function setForm(settings) {
  for (const [name, value] of Object.entries(settings)) {
    const el = $(name);
    if (el && value !== undefined && value !== null) el.value = value;
  }
}

// ---------------------------------------------------------------- generating

async function pollProgress() {
  const wantImage = number("preview_every") > 0 && $("live_previews_enable").checked;
  try {
    const p = await getJSON(`/progress?skip_current_image=${!wantImage}`);
    const state = p.state || {};
    $("progress").value = p.progress || 0;
    const step = state.sampling_steps ? `step ${state.sampling_step}/${state.sampling_steps}` : "";
    const eta = p.eta_relative > 0 ? `, ${p.eta_relative.toFixed(1)} s left` : "";
    $("progress-text").textContent = state.job_count ? `${step}${eta}` : (p.textinfo || "");
    if (p.current_image && page.running) {
      const src = "data:image/png;base64," + p.current_image;
      if ($("live-preview").src !== src) $("live-preview").src = src;
      $("live").hidden = false;
    }
  } catch (e) { /* the next poll tries again */ }
}

function results(response) {
  const info = JSON.parse(response.info);
  return response.images.map((b64, i) => {
    const seed = info.all_seeds[i];
    const settings = {
      prompt: info.prompt, negative_prompt: info.negative_prompt, width: info.width, height: info.height,
      steps: info.steps, sampler_name: info.sampler_name, scheduler: info.scheduler, cfg_scale: info.cfg_scale,
      seed, batch_size: 1, clip_skip: info.clip_skip,
    };
    return { b64, seed, infotext: info.infotexts[i], settings, name: gallery.nextName(seed) };
  });
}

async function generate(event) {
  event?.preventDefault();
  if (page.running || page.mode === "pnginfo") return;
  showError(null);
  let body;
  try {
    body = request();
  } catch (e) {
    showError(e);
    return;
  }
  page.lastRequest = body;
  page.running = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  page.polling = setInterval(pollProgress, 250);
  try {
    gallery.add(results(await postJSON(`/${page.mode}`, body)));
  } catch (e) {
    showError(e);
  } finally {
    clearInterval(page.polling);
    page.running = false;
    $("live").hidden = true;
    $("progress").value = 0;
    $("progress-text").textContent = "";
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

function interrupt() {
  if (page.running) postJSON("/interrupt", {}).catch(() => {});
}

// ---------------------------------------------------------------- images in: img2img, masks, PNG info

const readDataURL = (file) => new Promise((resolve, reject) => {
  const r = new FileReader();
  r.onload = () => resolve(r.result);
  r.onerror = () => reject(new Error(`cannot read ${file.name}`));
  r.readAsDataURL(file);
});

const loadImage = (src) => new Promise((resolve, reject) => {
  const img = new Image();
  img.onload = () => resolve(img);
  img.onerror = () => reject(new Error("that file is not an image the browser can read"));
  img.src = src;
});

const MAX_AUTO_SIDE = 1024;  // an image's size goes into the form, scaled down to this longest side

// The init image is sent as the file's own bytes (no canvas re-encoding); its size (multiples of 8, at most
// MAX_AUTO_SIDE on the longer side) goes into the form.
async function setInitImage(src) {
  const img = await loadImage(src);
  page.init = src;
  $("init-preview").src = src;
  mask.resize(img.naturalWidth, img.naturalHeight);
  $("use_mask").checked = false;
  $("drop-zone").classList.add("has-image");
  const scale = Math.min(1, MAX_AUTO_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
  $("width").value = Math.max(8, Math.round(img.naturalWidth * scale / 8) * 8);
  $("height").value = Math.max(8, Math.round(img.naturalHeight * scale / 8) * 8);
}

async function fileChosen(file, use) {
  if (!file) return;
  showError(null);
  try {
    await use(await readDataURL(file));
  } catch (e) {
    showError(e);
  }
}

function dropTarget(zone, use) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    fileChosen(e.dataTransfer.files[0], use);
  });
}

async function maskFromFile(src) {
  if (!page.init) throw new Error("Choose the image first, then its mask.");
  mask.load(await loadImage(src));
  $("use_mask").checked = true;
}

async function pngInfo(src) {
  const r = await postJSON("/png-info", { image: src });
  page.png = { src, parameters: r.parameters || {} };
  $("png-text").textContent = r.info || "This PNG holds no generation parameters.";
  $("png-to-txt2img").disabled = $("png-to-img2img").disabled = !r.info;
}

// A1111's infotext (as /png-info parses it) into the form: "Sampler: DPM++ 2M Karras" splits into sampler and
// schedule as A1111's paste does; one image of a batch is its own seed at batch size 1.
function infotextToForm(p) {
  const out = { prompt: p.Prompt ?? "", negative_prompt: p["Negative prompt"] ?? "", batch_size: 1 };
  const copy = { Steps: "steps", "CFG scale": "cfg_scale", Seed: "seed", "Size-1": "width", "Size-2": "height",
                 "Clip skip": "clip_skip", "Mask blur": "mask_blur" };
  for (const [key, id] of Object.entries(copy)) if (p[key] !== undefined) out[id] = p[key];
  if (out.clip_skip === undefined) out.clip_skip = 1;
  let sampler = p.Sampler, schedule = p["Schedule type"] || "Automatic";
  const samplers = [...$("sampler_name").options].map((o) => o.value);
  if (sampler && !samplers.includes(sampler) && sampler.endsWith(" Karras")) {
    sampler = sampler.slice(0, -" Karras".length);
    schedule = "Karras";
  }
  if (sampler) out.sampler_name = sampler;
  out.scheduler = schedule;
  setForm(out);
  setOverrides(infotextOverrides(p));
  const hires = p["Hires upscale"] !== undefined || p["Hires resize-1"] !== undefined;
  $("enable_hr").checked = hires;
  if (hires) {
    setForm({ hr_scale: p["Hires upscale"] ?? 2, hr_upscaler: p["Hires upscaler"],
              hr_second_pass_steps: p["Hires steps"] ?? 0, denoising_strength: p["Denoising strength"],
              hr_resize_x: p["Hires resize-1"] ?? 0, hr_resize_y: p["Hires resize-2"] ?? 0 });
  } else if (p["Denoising strength"] !== undefined) {
    $("i2i_denoising_strength").value = p["Denoising strength"];
  }
}

// The infotext's fields that are settings rather than form fields, as A1111's paste turns them into
// override_settings (infotext_to_setting_name_mapping), limited to those the server takes: RNG, Eta DDIM and the
// checkpoint by its Model hash (a listed title "name [hash]"); as A1111's, only those that differ from the server's
// options and the checkpoint picked (/png-info reads a missing RNG as "GPU").
const RNG_SOURCES = ["GPU", "NV", "CPU"];

function infotextOverrides(p) {
  const out = {};
  const current = page.options;
  if (RNG_SOURCES.includes(p.RNG) && p.RNG !== (current.randn_source ?? "GPU")) out.randn_source = p.RNG;
  const eta = Number(p["Eta DDIM"]);
  if (p["Eta DDIM"] !== undefined && Number.isFinite(eta) && eta >= 0 && eta <= 1
      && eta !== (current.eta_ddim ?? 0)) out.eta_ddim = eta;
  const hash = p["Model hash"];
  const title = hash && [...$("sd_model_checkpoint").options].map((o) => o.value)
    .find((t) => t.endsWith(` [${hash}]`));
  if (title && title !== $("sd_model_checkpoint").value) out.sd_model_checkpoint = title;
  return out;
}

function setOverrides(overrides) {
  page.overrides = overrides;
  const names = { randn_source: "RNG", eta_ddim: "Eta DDIM", sd_model_checkpoint: "Checkpoint" };
  const parts = Object.entries(overrides).map(([k, v]) => `${names[k] || k}: ${v}`);
  $("overrides-text").textContent = `Override settings from the PNG: ${parts.join(", ")}`;
  $("overrides").hidden = parts.length === 0;
}

// ---------------------------------------------------------------- wiring

function wire() {
  $("controls").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("random-seed").addEventListener("click", () => { $("seed").value = -1; });
  for (const name of ["txt2img", "img2img", "pnginfo"]) $(`tab-${name}`).addEventListener("click", () => setMode(name));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      generate();
    } else if (e.key === "Escape" && page.running && !$("viewer").open) {  // Escape in the viewer closes it
      interrupt();
    }
  });
  $("lora-picker").addEventListener("change", (e) => {
    if (e.target.value) insertIntoPrompt(`<lora:${e.target.value}:1>`);
    e.target.value = "";
  });
  $("embedding-picker").addEventListener("change", (e) => {
    if (e.target.value) insertIntoPrompt(e.target.value);
    e.target.value = "";
  });
  $("sd_model_checkpoint").addEventListener("change", (e) =>
    switchModel({ sd_model_checkpoint: e.target.value }, e.target.value));
  $("sd_vae").addEventListener("change", (e) => switchModel({ sd_vae: e.target.value }, `VAE ${e.target.value}`));
  $("preview_every").addEventListener("change", () =>
    postJSON("/options", { show_progress_every_n_steps: Math.max(0, number("preview_every")) }).catch(showError));
  $("live_previews_enable").addEventListener("change", (e) =>
    postJSON("/options", { live_previews_enable: e.target.checked }).catch(showError));
  $("overrides-clear").addEventListener("click", () => setOverrides({}));

  $("init-file").addEventListener("change", (e) => fileChosen(e.target.files[0], setInitImage));
  dropTarget($("drop-zone"), setInitImage);
  $("mask-file").addEventListener("change", (e) => fileChosen(e.target.files[0], maskFromFile));
  $("brush-size").addEventListener("input", (e) => { mask.brush = Number(e.target.value); });
  $("eraser").addEventListener("change", (e) => { mask.erasing = e.target.checked; });
  $("mask-clear").addEventListener("click", () => mask.clear());
  $("mask-invert").addEventListener("click", () => { mask.invert(); $("use_mask").checked = true; });

  $("png-file").addEventListener("change", (e) => fileChosen(e.target.files[0], pngInfo));
  dropTarget($("png-drop"), pngInfo);
  $("png-to-txt2img").addEventListener("click", () => { infotextToForm(page.png.parameters); setMode("txt2img"); });
  $("png-to-img2img").addEventListener("click", async () => {
    await setInitImage(page.png.src).catch(showError);
    infotextToForm(page.png.parameters);
    setMode("img2img");
  });
  $("clear-results").addEventListener("click", () => gallery.clear());
}

wire();
gallery.restore();
loadChoices().catch(showError);
window.tritonsd = { page, mask, gallery, request };  // for the browser tests and the console

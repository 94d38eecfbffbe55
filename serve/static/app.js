// tritonsd's page: a form for /sdapi/v1/txt2img, live progress from /sdapi/v1/progress, and a gallery whose
// items keep their settings (click an image or "Reuse" to put them back into the form). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const API = "/sdapi/v1";
const FIELDS = ["prompt", "negative_prompt", "width", "height", "steps", "sampler_name", "scheduler", "cfg_scale",
                "seed", "batch_size"];
const NUMBERS = new Set(["width", "height", "steps", "cfg_scale", "seed", "batch_size", "hr_scale",
                         "hr_second_pass_steps", "denoising_strength"]);
// hires fix (webui's UI defaults: Latent, 2x, the first pass's steps, strength 0.7), sent when its box is ticked
const HIRES = ["hr_upscaler", "hr_scale", "hr_second_pass_steps", "denoising_strength"];
let polling = null;

async function getJSON(path, options) {
  const response = await fetch(API + path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && (typeof body.detail === "string" ? body.detail : body.errors);
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

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
  $("model").textContent = options.sd_model_checkpoint || "";
}

function request() {
  const body = {};
  for (const name of FIELDS) {
    const raw = $(name).value;
    body[name] = NUMBERS.has(name) ? Number(raw) : raw;
  }
  if ($("enable_hr").checked) {
    body.enable_hr = true;
    for (const name of HIRES) body[name] = NUMBERS.has(name) ? Number($(name).value) : $(name).value;
  }
  return body;
}

function setForm(settings) {
  for (const name of FIELDS) {
    if (settings[name] !== undefined && settings[name] !== null) $(name).value = settings[name];
  }
}

async function pollProgress() {
  try {
    const p = await getJSON("/progress?skip_current_image=true");
    const state = p.state || {};
    $("progress").value = p.progress || 0;
    const step = state.sampling_steps ? `step ${state.sampling_step}/${state.sampling_steps}` : "";
    const eta = p.eta_relative > 0 ? `, ${p.eta_relative.toFixed(1)} s left` : "";
    $("progress-text").textContent = state.job_count ? `${step}${eta}` : (p.textinfo || "");
  } catch (e) { /* the next poll tries again */ }
}

function addResults(result) {
  const info = JSON.parse(result.info);
  result.images.forEach((b64, i) => {
    const settings = {
      prompt: info.prompt, negative_prompt: info.negative_prompt, width: info.width, height: info.height,
      steps: info.steps, sampler_name: info.sampler_name, scheduler: info.scheduler, cfg_scale: info.cfg_scale,
      seed: info.all_seeds[i], batch_size: 1,
    };
    const card = document.createElement("figure");
    card.className = "result";
    const img = new Image();
    img.src = "data:image/png;base64," + b64;
    img.alt = info.prompt;
    img.title = "click to reuse these settings";
    img.addEventListener("click", () => setForm(settings));
    const text = document.createElement("pre");
    text.textContent = info.infotexts[i];
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Reuse";
    reuse.addEventListener("click", () => setForm(settings));
    card.append(img, text, reuse);
    $("gallery").prepend(card);
  });
}

async function generate(event) {
  event.preventDefault();
  $("error").textContent = "";
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  polling = setInterval(pollProgress, 300);
  try {
    addResults(await getJSON("/txt2img", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request()),
    }));
  } catch (e) {
    $("error").textContent = String(e.message || e);
  } finally {
    clearInterval(polling);
    $("progress").value = 0;
    $("progress-text").textContent = "";
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

$("controls").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => getJSON("/interrupt", { method: "POST" }).catch(() => {}));
loadChoices().catch((e) => { $("error").textContent = String(e.message || e); });

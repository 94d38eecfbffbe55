// Results: cards with the image, its infotext and buttons (reuse the settings, use / copy the seed, view full
// size, download); kept in localStorage so a reload shows them again (the newest MAX_KEPT, and fewer when the
// browser's storage is full). A download is the exact PNG the server returned, infotext inside, named as
// Pipeline.save names files (NNNNN-seed.png).
"use strict";

const STORE_KEY = "tritonsd.results";
const COUNTER_KEY = "tritonsd.counter";
const MAX_KEPT = 12;

class Gallery {
  constructor(root, viewer, onReuse) {
    this.root = root;
    this.viewer = viewer;
    this.onReuse = onReuse;  // (settings) -> void: puts a result's settings back into the form
    this.items = [];  // newest first: {b64, name, seed, infotext, settings}
    viewer.querySelector("#viewer-close").addEventListener("click", () => viewer.close());
    viewer.addEventListener("click", (e) => { if (e.target === viewer) viewer.close(); });
  }

  restore() {
    try {
      const saved = JSON.parse(localStorage.getItem(STORE_KEY) || "[]");
      if (Array.isArray(saved)) this.items = saved.filter((x) => x && typeof x.b64 === "string").slice(0, MAX_KEPT);
    } catch (e) { this.items = []; }
    this.render();
  }

  nextName(seed) {
    const n = (Number(localStorage.getItem(COUNTER_KEY)) || 0);
    try { localStorage.setItem(COUNTER_KEY, String(n + 1)); } catch (e) { /* storage full: names still count on */ }
    return `${String(n).padStart(5, "0")}-${seed}.png`;
  }

  add(items) {
    this.items = [...items.reverse(), ...this.items].slice(0, MAX_KEPT);
    this.save();
    this.render();
  }

  clear() {
    this.items = [];
    this.save();
    this.render();
  }

  save() {
    for (let keep = this.items.length; keep >= 0; keep--) {
      try {
        localStorage.setItem(STORE_KEY, JSON.stringify(this.items.slice(0, keep)));
        return;
      } catch (e) { /* over the quota: keep fewer */ }
    }
  }

  render() {
    this.root.replaceChildren(...this.items.map((item) => this.card(item)));
  }

  card(item) {
    const card = document.createElement("figure");
    card.className = "result";
    const img = new Image();
    img.src = "data:image/png;base64," + item.b64;
    img.alt = `result, seed ${item.seed}: ${item.settings.prompt || ""}`;
    img.title = "click for the full-size image";
    img.tabIndex = 0;
    img.addEventListener("click", () => this.view(item));
    img.addEventListener("keydown", (e) => { if (e.key === "Enter") this.view(item); });
    const text = document.createElement("pre");
    text.textContent = item.infotext;
    const buttons = document.createElement("div");
    buttons.className = "card-buttons";
    buttons.append(
      button("Reuse", "put these settings back into the form", () => this.onReuse(item.settings)),
      button("Use seed", "put this seed into the form", () => this.onReuse({ seed: item.seed })),
      button("Copy seed", "copy the seed to the clipboard", (b) => copyText(String(item.seed), b)),
      download(item));
    card.append(img, buttons, text);
    return card;
  }

  view(item) {
    const v = this.viewer;
    v.querySelector("#viewer-img").src = "data:image/png;base64," + item.b64;
    v.querySelector("#viewer-img").alt = `full size, seed ${item.seed}`;
    v.querySelector("#viewer-text").textContent = item.infotext;
    const a = v.querySelector("#viewer-download");
    a.href = blobURL(item.b64);
    a.download = item.name;
    v.showModal();
  }
}

function button(label, title, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", () => action(b));
  return b;
}

function download(item) {
  const a = document.createElement("a");
  a.className = "download";
  a.textContent = "Download";
  a.download = item.name;
  a.title = `save ${item.name} (its settings are inside the PNG)`;
  a.href = "#";
  a.addEventListener("click", () => { a.href = blobURL(item.b64); });  // made when asked: no URL per card kept
  return a;
}

// The server's PNG bytes, unchanged: its infotext chunk is inside.
function blobURL(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
}

async function copyText(text, b) {
  const label = b.textContent;
  try {
    await navigator.clipboard.writeText(text);
    b.textContent = "Copied";
  } catch (e) {
    b.textContent = "Copy failed";
  }
  setTimeout(() => { b.textContent = label; }, 1200);
}

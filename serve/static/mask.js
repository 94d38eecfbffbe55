// The inpainting mask: a plain canvas over the init image, at the image's own pixel size, painted with pointer
// events (mouse, pen, touch). White strokes on a transparent canvas are the area to repaint; the mask sent to the
// server is those strokes over black, as A1111's inpaint tab sends it. No library.
"use strict";

class MaskEditor {
  constructor(canvas, onPaint) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.onPaint = onPaint;  // called once a stroke starts (the page ticks "Inpaint")
    this.brush = 24;  // in screen (CSS) pixels: the same size on screen whatever the image's size
    this.scale = 1;  // image pixels per CSS pixel, measured when a stroke starts
    this.erasing = false;
    this.last = null;  // the previous point of the stroke being drawn
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const name of ["pointerup", "pointercancel", "pointerleave"]) {
      canvas.addEventListener(name, () => { this.last = null; });
    }
  }

  // A new image: the mask is cleared and takes the image's size.
  resize(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  // Painted becomes unpainted and the other way round (alpha inverted; the strokes stay white).
  invert() {
    const { width, height } = this.canvas;
    const data = this.ctx.getImageData(0, 0, width, height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      px[i] = px[i + 1] = px[i + 2] = 255;
      px[i + 3] = 255 - px[i + 3];
    }
    this.ctx.putImageData(data, 0, 0);
  }

  // An uploaded mask: its brightness becomes the painted alpha (white = repaint), scaled to the image.
  load(image) {
    const { width, height } = this.canvas;
    const tmp = document.createElement("canvas");
    tmp.width = width;
    tmp.height = height;
    const t = tmp.getContext("2d");
    t.drawImage(image, 0, 0, width, height);
    const data = t.getImageData(0, 0, width, height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const luma = (px[i] * 299 + px[i + 1] * 587 + px[i + 2] * 114) / 1000;  // PIL's convert("L")
      px[i] = px[i + 1] = px[i + 2] = 255;
      px[i + 3] = Math.round(luma * px[i + 3] / 255);
    }
    this.ctx.putImageData(data, 0, 0);
  }

  isEmpty() {
    const px = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height).data;
    for (let i = 3; i < px.length; i += 4) if (px[i]) return false;
    return true;
  }

  // The mask as a PNG data URL: the strokes (white, their alpha as coverage) over black.
  toDataURL() {
    const out = document.createElement("canvas");
    out.width = this.canvas.width;
    out.height = this.canvas.height;
    const o = out.getContext("2d");
    o.fillStyle = "#000";
    o.fillRect(0, 0, out.width, out.height);
    o.drawImage(this.canvas, 0, 0);
    return out.toDataURL("image/png");
  }

  point(e) {
    const r = this.canvas.getBoundingClientRect();  // the canvas is shown scaled: CSS pixels -> image pixels
    return [(e.clientX - r.left) * this.canvas.width / r.width, (e.clientY - r.top) * this.canvas.height / r.height];
  }

  down(e) {
    if (!this.canvas.width) return;
    e.preventDefault();
    this.scale = this.canvas.width / this.canvas.getBoundingClientRect().width;
    this.canvas.setPointerCapture?.(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
    this.onPaint?.();
  }

  move(e) {
    if (!this.last) return;
    e.preventDefault();
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
  }

  stroke(from, to) {
    const c = this.ctx;
    c.globalCompositeOperation = this.erasing ? "destination-out" : "source-over";
    c.strokeStyle = c.fillStyle = "#fff";
    const width = this.brush * this.scale;
    c.lineWidth = width;
    c.lineCap = c.lineJoin = "round";
    c.beginPath();
    c.moveTo(...from);
    c.lineTo(...to);
    c.stroke();
    c.beginPath();
    c.arc(...to, width / 2, 0, 2 * Math.PI);
    c.fill();
    c.globalCompositeOperation = "source-over";
  }
}

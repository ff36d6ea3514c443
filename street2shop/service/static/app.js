// The search page: drop, pick or paste a photo -> POST /search -> the proxy output, the top-k products, timings.
// Plain JavaScript, no framework and no build step: the package serves this file as it is.
"use strict";

const $ = (id) => document.getElementById(id);
const dropZone = $("drop-zone");
const fileInput = $("file-input");
const statusLine = $("status");
let queryUrl = null;

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function showCropBox(box) {
  const frame = $("crop-box");
  const image = $("query-image");
  if (!box || !image.naturalWidth) {
    frame.hidden = true;
    $("crop-note").textContent = "";
    return;
  }
  const [x0, y0, x1, y1] = box;
  const w = image.naturalWidth;
  const h = image.naturalHeight;
  Object.assign(frame.style, {
    left: `${(100 * x0) / w}%`, top: `${(100 * y0) / h}%`,
    width: `${(100 * (x1 - x0)) / w}%`, height: `${(100 * (y1 - y0)) / h}%`,
  });
  frame.hidden = false;
  $("crop-note").textContent = " (orange: where the proxy found the garment)";
}

function showTimings(timings, batchSize) {
  const body = $("timings").querySelector("tbody");
  body.replaceChildren();
  const rows = Object.entries(timings);
  if (batchSize) rows.push(["batch size", batchSize]);
  for (const [name, value] of rows) {
    const row = body.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = typeof value === "number" && name !== "batch size" ? value.toFixed(1) : value;
  }
  $("timings").hidden = false;
}

function showResults(results) {
  const list = $("results");
  list.replaceChildren();
  results.forEach((hit, i) => {
    const item = document.createElement("li");
    item.className = "result" + (i === 0 ? " first" : "");
    item.dataset.productId = hit.product_id;
    const link = document.createElement("a");
    link.href = hit.image_url;
    link.target = "_blank";
    link.rel = "noopener";
    link.setAttribute("aria-label", `Rank ${hit.rank}: product ${hit.product_id}, score ${hit.score.toFixed(3)}`);
    const image = document.createElement("img");
    image.src = hit.image_url;
    image.alt = `Product ${hit.product_id}`;
    image.loading = "lazy";
    const caption = document.createElement("div");
    caption.className = "caption";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = hit.product_id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `score ${hit.score.toFixed(3)}`;
    const bar = document.createElement("div");
    bar.className = "score-bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, hit.score)) * 100}%`;
    bar.append(fill);
    caption.append(rank, id, score, bar);
    link.append(image, caption);
    item.append(link);
    list.append(item);
  });
  $("empty-note").hidden = results.length > 0;
  $("results-title").textContent = `Results (top ${results.length})`;
}

async function searchWith(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`"${file.name}" is not an image.`, true);
    return;
  }
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  $("query-image").src = queryUrl;
  $("crop-box").hidden = true;
  $("proxy-image").removeAttribute("src");
  $("inputs").hidden = false;
  setStatus("Searching…");
  document.body.classList.add("busy");
  const form = new FormData();
  form.append("image", file, file.name || "pasted.png");
  form.append("k", $("k-input").value || "10");
  form.append("proxy_image", "true");
  try {
    const response = await fetch("/search", { method: "POST", body: form });
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    $("proxy-image").src = body.proxy_image;
    const image = $("query-image");
    if (image.complete) showCropBox(body.crop_box);
    else image.onload = () => showCropBox(body.crop_box);
    showResults(body.results);
    showTimings(body.timings_ms, body.batch_size);
    setStatus(`Found ${body.results.length} products in ${body.timings_ms.total.toFixed(0)} ms.`);
  } catch (error) {
    setStatus(`Search failed: ${error.message}`, true);
  } finally {
    document.body.classList.remove("busy");
  }
}

dropZone.addEventListener("click", () => fileInput.click());
dropZone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    fileInput.click();
  }
});
fileInput.addEventListener("change", () => {
  searchWith(fileInput.files[0]);
  fileInput.value = "";  // the same file picked again searches again
});
for (const name of ["dragenter", "dragover"]) {
  dropZone.addEventListener(name, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
}
for (const name of ["dragleave", "drop"]) {
  dropZone.addEventListener(name, () => dropZone.classList.remove("dragging"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  searchWith(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => {
  const item = [...(event.clipboardData?.items || [])].find((entry) => entry.type.startsWith("image/"));
  if (item) {
    event.preventDefault();
    searchWith(item.getAsFile());
  }
});

fetch("/health")
  .then((response) => response.json())
  .then((health) => {
    const p = health.pipeline || {};
    const parts = [`${p.products} products`];
    if (p.recipe) parts.push(`recipe ${p.recipe}`);
    if (p.descriptor) parts.push(`descriptor ${p.descriptor}`);
    if (p.proxy && p.proxy !== "none") parts.push(`proxy ${p.proxy}`);
    $("catalog-info").textContent = parts.join(" · ");
  })
  .catch(() => {});

// The try-it page: one conversation per browser. The browser keeps only its user id (and the access token);
// the chain of pictures comes from the service, so a reload, a second tab or a restart show the same thing.
"use strict";

const KEYS = { user: "nanobanana.userId", token: "nanobanana.token" };
const POLL_EVERY_MS = 2000; // while a picture waits in line
const LONG_POLL_SECONDS = 25; // while it is being made: the answer comes when it is ready
const FIRST_WAIT_SECONDS = 3; // the first answer comes back soon, to say whether the picture waits in line
const GIVE_UP_AFTER_MS = 5 * 60 * 1000;

const $ = (id) => document.getElementById(id);
const form = $("make");
const promptBox = $("prompt");
const imageUrlBox = $("image-url");
const modelBox = $("model");
const aspectRatioBox = $("aspect-ratio");
const resolutionBox = $("resolution");
const photoInput = $("photo");
const MODEL_LIMITS = JSON.parse($("model-limits").textContent); // the service's own table of what each model takes
const tokenBox = $("token");
const submitButton = $("submit");
const startOverButton = $("start-over");
const undoButton = $("undo");
const cancelButton = $("cancel");
const editingNote = $("editing");
let chain = [];
let editFrom = null; // the task_id of an earlier picture chosen with "Edit this one"
let chosenPhoto = null; // the address of the photo uploaded to start from
let photoTurn = 0; // each photo chosen (or removed) takes a turn: a photo still uploading when its turn is over is dropped
let uploading = false;
const statusLine = $("status");
const clock = $("clock"); // the seconds while a picture is made: shown, not read out every second
const errorLine = $("error");

function newUserId() {
  const random = window.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
  return "web-" + random;
}

function userId() {
  let id = localStorage.getItem(KEYS.user);
  if (!id) {
    id = newUserId();
    localStorage.setItem(KEYS.user, id);
  }
  return id;
}

function historyUrl(suffix = "") {
  return "/nanobanana/history/" + encodeURIComponent(userId()) + suffix;
}

// The conversation as the service remembers it.
async function loadChain() {
  try {
    const answer = await fetch(historyUrl(), { headers: authHeaders() });
    if (answer.ok) {
      chain = (await answer.json()).chain;
      render();
    }
  } catch (_) {
    showError("The service could not be reached. Please check your connection and try again.");
  }
}

function authHeaders() {
  const token = tokenBox.value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = false;
}

function clearError() {
  errorLine.textContent = "";
  errorLine.hidden = true;
}

function picture(url, caption, number) {
  const figure = document.createElement("figure");
  const image = document.createElement("img");
  image.src = url;
  image.alt = caption;
  const text = document.createElement("figcaption");
  text.textContent = caption;
  const download = document.createElement("a");
  downloadLink(download, url);
  download.textContent = "Download";
  download.setAttribute("aria-label", "Download picture " + number + ": " + caption);
  figure.append(image, text, download);
  return figure;
}

// A browser saves a picture of this page's own origin (a copy under /media/); one kept elsewhere (the image
// service, a bucket) it can only show, so that one opens in a new tab, where it can be saved.
function downloadLink(link, url) {
  link.href = onThisPage(url);
  link.download = "";
  const elsewhere = new URL(link.href, location.href).origin !== location.origin;
  link.target = elsewhere ? "_blank" : "";
  link.rel = elsewhere ? "noopener" : "";
}

// The service names its own files by its public address; on this machine that may be 127.0.0.1 while the page
// was opened as localhost (or the other way round): the same port on a loopback name is this page's own.
function onThisPage(url) {
  const target = new URL(url, location.href);
  const loopback = (host) => ["127.0.0.1", "localhost", "[::1]"].includes(host);
  const sameMachine = loopback(target.hostname) && loopback(location.hostname) && target.port === location.port;
  return target.origin !== location.origin && sameMachine ? target.pathname : target.href;
}

function editButton(step, number) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "secondary";
  button.textContent = "Edit this one";
  button.setAttribute("aria-label", "Edit picture " + number + ": " + (step.prompt || ""));
  button.addEventListener("click", () => chooseToEdit(step, number));
  return button;
}

function chooseToEdit(step, number) {
  forgetPhoto(); // the earlier picture is the one to start from now
  imageUrlBox.value = "";
  editFrom = step.task_id;
  editingNote.textContent = "Your next prompt edits picture " + number + " (" + (step.prompt || "") + ").";
  editingNote.hidden = false;
  promptBox.focus();
}

function render() {
  const list = $("chain");
  list.replaceChildren(
    ...chain.map((step, index) => {
      const item = document.createElement("li");
      item.append(picture(step.image_url, step.prompt || "", index + 1));
      if (index < chain.length - 1) item.append(editButton(step, index + 1));
      return item;
    })
  );
  $("chain-empty").hidden = chain.length > 0;
  undoButton.disabled = chain.length === 0;
  if (editFrom && !chain.some((step) => step.task_id === editFrom)) editFrom = null;
  editingNote.hidden = !editFrom;
  const last = chain[chain.length - 1];
  $("result").hidden = !last;
  if (last) {
    $("result-image").src = last.image_url;
    $("result-image").alt = last.prompt;
    $("result-caption").textContent = last.prompt;
    downloadLink($("result-download"), last.image_url);
  }
}

// Ask the service, then follow status_url: every few seconds while the picture waits in line (to show its
// place), and while it is being made with a long poll, which the service answers the moment it is ready.
async function generate(body, waiting) {
  const started = Date.now();
  let answer = await fetch("/nanobanana", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify({ ...body, wait: FIRST_WAIT_SECONDS }),
  });
  let data = await readJson(answer);
  while (answer.status === 202 && Date.now() - started < GIVE_UP_AFTER_MS) {
    waiting.update(data);
    const next = new URL("/nanobanana/tasks/" + encodeURIComponent(data.task_id), location.href);
    if (data.queue_position) await new Promise((resolve) => setTimeout(resolve, POLL_EVERY_MS));
    else next.searchParams.set("wait", String(LONG_POLL_SECONDS));
    answer = await fetch(next, { headers: authHeaders() });
    data = await readJson(answer);
  }
  return { status: answer.status, data };
}

function ordinal(number) {
  const teen = number % 100 >= 11 && number % 100 <= 13;
  return number + (teen ? "th" : { 1: "st", 2: "nd", 3: "rd" }[number % 10] || "th");
}

// What the page says while it waits: the place in line (with a Cancel button), then the seconds in the making.
function waitingDisplay() {
  let place = null;
  let since = Date.now();
  const tick = () => {
    const words = place ? ordinal(place) + " in line for the image service…" : "Making your picture…";
    if (statusLine.textContent !== words) statusLine.textContent = words; // announced when it changes only
    clock.textContent = place ? "" : Math.floor((Date.now() - since) / 1000) + " s";
  };
  tick();
  const timer = setInterval(tick, 1000);
  return {
    update(data) {
      const next = data.queue_position || null;
      if (place && !next) since = Date.now(); // out of the line: the making starts now
      place = next;
      cancelButton.hidden = !place;
      cancelButton.dataset.taskId = data.task_id || "";
      tick();
    },
    stop() {
      clearInterval(timer);
      clock.textContent = "";
      cancelButton.hidden = true;
    },
  };
}

async function cancelWaiting() {
  cancelButton.disabled = true;
  try {
    const answer = await fetch("/nanobanana/tasks/" + encodeURIComponent(cancelButton.dataset.taskId), {
      method: "DELETE",
      headers: authHeaders(),
    });
    if (answer.status === 409) showError("The picture has already started, so it can no longer be cancelled.");
    else if (!answer.ok) showError(((await readJson(answer)).error || {}).message || "It could not be cancelled.");
    else cancelButton.hidden = true;
  } catch (_) {
    showError("The service could not be reached. Please check your connection and try again.");
  } finally {
    cancelButton.disabled = false;
  }
}

async function readJson(answer) {
  try {
    return await answer.json();
  } catch (_) {
    return { error: { message: "The service sent an answer this page cannot read (HTTP " + answer.status + ")." } };
  }
}

async function make(event) {
  event.preventDefault();
  if (submitButton.disabled) return; // Ctrl+Enter while a picture is on its way
  clearError();
  if (uploading) {
    showError("Your photo is still being sent. Please press Make it again in a moment.");
    return;
  }
  const prompt = promptBox.value.trim();
  if (!prompt) {
    showError("Please write what the picture should show.");
    promptBox.focus();
    return;
  }
  const body = { prompt, user_id: userId(), model: modelBox.value };
  if (aspectRatioBox.value) body.aspect_ratio = aspectRatioBox.value;
  if (resolutionBox.value && !resolutionBox.disabled) body.resolution = resolutionBox.value;
  const imageUrl = imageUrlBox.value.trim();
  const photo = chosenPhoto;
  if (photo) body.image_url = photo;
  else if (imageUrl) body.image_url = imageUrl;
  else if (editFrom) body.from_task = editFrom;

  submitButton.disabled = true;
  const waiting = waitingDisplay();
  try {
    const { status, data } = await generate(body, waiting);
    if (status === 200) {
      editFrom = null;
      await loadChain();
      // what was sent is used up; what was typed or chosen meanwhile stays for the next picture
      if (promptBox.value.trim() === prompt) promptBox.value = "";
      if (imageUrlBox.value.trim() === imageUrl) imageUrlBox.value = "";
      if (photo && chosenPhoto === photo) forgetPhoto();
      statusLine.textContent = "Done in " + Math.round(data.elapsed_seconds) + " s. Describe a change to edit it.";
    } else if (status === 410) {
      statusLine.textContent = "Cancelled. Nothing was charged.";
    } else if (status === 202) {
      statusLine.textContent = "";
      showError("The picture is taking unusually long. Please try again in a few minutes.");
    } else {
      statusLine.textContent = "";
      showError((data.error && data.error.message) || "Something went wrong (HTTP " + status + ").");
    }
  } catch (_) {
    statusLine.textContent = "";
    showError("The service could not be reached. Please check your connection and try again.");
  } finally {
    waiting.stop();
    submitButton.disabled = false;
  }
}

async function startOver() {
  clearError();
  try {
    const answer = await fetch("/nanobanana/history/" + encodeURIComponent(userId()), {
      method: "DELETE",
      headers: authHeaders(),
    });
    if (!answer.ok) {
      const data = await readJson(answer);
      showError((data.error && data.error.message) || "Could not start over (HTTP " + answer.status + ").");
      return;
    }
  } catch (_) {
    showError("The service could not be reached. Please check your connection and try again.");
    return;
  }
  chain = [];
  editFrom = null;
  forgetPhoto();
  render();
  statusLine.textContent = "Started over. The next picture begins a new conversation.";
  promptBox.focus();
}

async function undo() {
  clearError();
  try {
    const answer = await fetch(historyUrl("/undo"), { method: "POST", headers: authHeaders() });
    const data = await readJson(answer);
    if (!answer.ok) {
      showError((data.error && data.error.message) || "Could not undo (HTTP " + answer.status + ").");
      return;
    }
    chain = data.chain;
    render();
    statusLine.textContent = chain.length
      ? "Went back one step." + (chosenPhoto || imageUrlBox.value.trim() ? "" : " The next prompt edits this picture.")
      : "Went back to the start. The next picture begins a new conversation.";
  } catch (_) {
    showError("The service could not be reached. Please check your connection and try again.");
  }
}

// The choices the chosen model has, from the service's table: its aspect ratios, and its resolutions if any.
function offerModelChoices() {
  const limits = MODEL_LIMITS[modelBox.value];
  fillChoices(aspectRatioBox, limits.aspect_ratios, "As the model chooses");
  fillChoices(resolutionBox, limits.resolutions, "As the model chooses");
  const takesResolution = limits.resolutions.length > 0;
  $("resolution-choice").hidden = !takesResolution;
  resolutionBox.disabled = !takesResolution;
  promptBox.maxLength = limits.max_prompt;
}

function fillChoices(select, values, unset) {
  const kept = select.value;
  const options = [new Option(unset, ""), ...values.map((value) => new Option(value, value))];
  select.replaceChildren(...options);
  select.value = values.includes(kept) ? kept : "";
}

// A photo from the device: uploaded, then shown as the picture the next prompt starts from.
async function choosePhoto(file) {
  clearError();
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError("That file is not a picture. Please choose a PNG, JPEG, WebP or GIF.");
    return;
  }
  statusLine.textContent = "Sending your photo…";
  const turn = ++photoTurn;
  uploading = true;
  const form = new FormData();
  form.append("file", file);
  try {
    const answer = await fetch("/nanobanana/uploads?user_id=" + encodeURIComponent(userId()), {
      method: "POST",
      headers: authHeaders(),
      body: form,
    });
    const data = await readJson(answer);
    if (turn !== photoTurn) return; // removed, or another photo chosen, while this one was on its way
    if (!answer.ok) {
      statusLine.textContent = "";
      showError((data.error && data.error.message) || "The photo could not be sent (HTTP " + answer.status + ").");
      return;
    }
    showPhoto(data.url);
    statusLine.textContent = "Your photo is ready. Describe how to change it, then press Make it.";
    promptBox.focus();
  } catch (_) {
    statusLine.textContent = "";
    showError("The service could not be reached. Please check your connection and try again.");
  } finally {
    if (turn === photoTurn) uploading = false;
    photoInput.value = "";
  }
}

function showPhoto(url) {
  chosenPhoto = url;
  editFrom = null; // the photo is the one to start from now
  editingNote.hidden = true;
  $("chosen-image").src = url;
  $("chosen").hidden = false;
}

function forgetPhoto() {
  photoTurn += 1; // a photo still on its way is no longer wanted
  uploading = false;
  chosenPhoto = null;
  $("chosen").hidden = true;
  $("chosen-image").removeAttribute("src");
}

function firstPicture(files) {
  return Array.from(files || []).find((file) => file.type.startsWith("image/")) || (files && files[0]);
}

function listenForPhotos() {
  const zone = $("drop-zone");
  photoInput.addEventListener("change", () => choosePhoto(photoInput.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    choosePhoto(firstPicture(event.dataTransfer.files));
  });
  document.addEventListener("paste", (event) => {
    const file = firstPicture(event.clipboardData && event.clipboardData.files);
    if (file && file.type.startsWith("image/")) {
      event.preventDefault(); // a pasted picture, not text: the prompt keeps what it has
      choosePhoto(file);
    }
  });
  $("remove-photo").addEventListener("click", () => {
    forgetPhoto();
    statusLine.textContent = "The photo was removed.";
    photoInput.focus();
  });
}

tokenBox.value = localStorage.getItem(KEYS.token) || "";
tokenBox.addEventListener("change", () => {
  localStorage.setItem(KEYS.token, tokenBox.value.trim());
  loadChain();
});
promptBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
});
form.addEventListener("submit", make);
startOverButton.addEventListener("click", startOver);
undoButton.addEventListener("click", undo);
cancelButton.addEventListener("click", cancelWaiting);
modelBox.addEventListener("change", offerModelChoices);
listenForPhotos();
offerModelChoices();
render();
loadChain();

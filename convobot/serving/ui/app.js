// convobot's page: chat, arena and runs over the server's OpenAI-compatible API (convobot/serving/ui.py).
// Plain modules, no build step, nothing fetched from anywhere but this server.

const $ = (id) => document.getElementById(id);
const state = { models: [], chat: [], arenaContext: [] };

// ----------------------------------------------------------------------------- the API

const apiKey = () => localStorage.getItem("convobot.apiKey") || "";

function headers(json) {
  const found = json ? { "content-type": "application/json" } : {};
  if (apiKey()) found.authorization = `Bearer ${apiKey()}`;
  return found;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error?.message ?? JSON.stringify(body)}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

// Streams one chat completion; onText gets the answer so far. Returns the answer, its token count and timings.
async function streamChat(model, messages, settings, onText) {
  const started = performance.now();
  let text = "", usage = null, first = null;
  const response = await api("/v1/chat/completions", {
    method: "POST",
    body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...settings }),
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  const finish = () => ({
    text, completionTokens: usage?.completion_tokens ?? null, seconds: (performance.now() - started) / 1000,
    firstTokenSeconds: first === null ? null : (first - started) / 1000,
  });
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish();
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return finish();
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        if (first === null) first = performance.now();
        text += delta;
        onText(text);
      }
    }
  }
}

function speed(result) {
  const tokens = result.completionTokens ?? "?";
  const rate = result.completionTokens ? ` · ${(result.completionTokens / result.seconds).toFixed(1)} tok/s` : "";
  const first = result.firstTokenSeconds === null ? "" : ` · first token ${result.firstTokenSeconds.toFixed(2)} s`;
  return `${tokens} tokens in ${result.seconds.toFixed(2)} s${rate}${first}`;
}

function userTurn(message, input) {
  return input.trim() ? { role: "user", content: message, input } : { role: "user", content: message };
}

function element(tag, className, text) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (text !== undefined) made.textContent = text;
  return made;
}

// ----------------------------------------------------------------------------- models

async function loadModels() {
  try {
    const body = await (await api("/v1/models")).json();
    state.models = body.data.map((model) => model.id);
    showError("");
  } catch (err) {
    state.models = [];
    showError(`${err.message}${err.message.startsWith("401") ? " (enter the API key above)" : ""}`);
  }
  const chatModel = $("chat-model").value;
  $("chat-model").replaceChildren(...state.models.map((id) => new Option(id, id, false, id === chatModel)));
  $("arena-heldout-model").replaceChildren(new Option("(choose a model)", ""),
    ...state.models.map((id) => new Option(id, id)));
  const checked = new Set([...document.querySelectorAll("#arena-models input:checked")].map((box) => box.value));
  if (!checked.size) state.models.slice(0, 2).forEach((id) => checked.add(id));
  $("arena-models").replaceChildren(...state.models.map((id) => {
    const label = element("label");
    const box = Object.assign(document.createElement("input"), { type: "checkbox", value: id, checked: checked.has(id) });
    box.addEventListener("change", limitArena);
    label.append(box, ` ${id}`);
    return label;
  }));
  limitArena();
}

// ----------------------------------------------------------------------------- chat

function chatSettings() {
  const stop = $("chat-stop").value.split(",").map((s) => s.trim().replaceAll("\\n", "\n")).filter(Boolean);
  return {
    temperature: Number($("chat-temperature").value), top_p: Number($("chat-top-p").value),
    max_tokens: Number($("chat-max-tokens").value), ...(stop.length ? { stop } : {}),
  };
}

function renderChat() {
  $("chat-log").replaceChildren(...state.chat.map((turn) => {
    const box = element("div", `message ${turn.role}`, turn.content);
    if (turn.input) box.append(element("div", "input", `Input: ${turn.input}`));
    if (turn.meta) box.append(element("div", "meta", turn.meta));
    return box;
  }));
}

async function answerChat() {
  const system = $("chat-system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []),
    ...state.chat.map(({ role, content, input }) => (input ? { role, content, input } : { role, content }))];
  const reply = { role: "assistant", content: "" };
  state.chat.push(reply);
  renderChat();
  const shown = $("chat-log").lastElementChild;
  setBusy("chat", true);
  try {
    const result = await streamChat($("chat-model").value, messages, chatSettings(), (text) => {
      shown.textContent = text;
    });
    reply.content = result.text;
    reply.meta = speed(result);
    showError("");
  } catch (err) {
    state.chat.pop();
    showError(err.message);
  } finally {
    setBusy("chat", false);
    renderChat();
  }
}

async function sendChat(event) {
  event.preventDefault();
  if (!$("chat-message").value.trim()) return showError("the message is empty");
  state.chat.push(userTurn($("chat-message").value, $("chat-input").value));
  await answerChat();
  if (state.chat.at(-1)?.role === "assistant") {
    $("chat-message").value = "";
    $("chat-input").value = "";
  } else {
    state.chat.pop(); // not answered: the question stays in the box to send again
    renderChat();
  }
}

async function regenerate() {
  const previous = state.chat.at(-1)?.role === "assistant" ? state.chat.pop() : null;
  if (!state.chat.length) return;
  await answerChat();
  if (previous && state.chat.at(-1)?.role !== "assistant") {
    state.chat.push(previous); // the new answer failed: the old one stays
    renderChat();
  }
}

function setBusy(panel, busy) {
  document.querySelectorAll(`#${panel} button`).forEach((button) => { button.disabled = busy; });
}

// ----------------------------------------------------------------------------- arena

function limitArena() {
  const boxes = [...document.querySelectorAll("#arena-models input")];
  const checked = boxes.filter((box) => box.checked).length;
  boxes.forEach((box) => { box.disabled = !box.checked && checked >= 4; });
}

async function sendArena(event) {
  event.preventDefault();
  const models = [...document.querySelectorAll("#arena-models input:checked")].map((box) => box.value);
  if (models.length < 2) return showError("choose 2 to 4 models to compare");
  if (!$("arena-message").value.trim()) return showError("the message is empty");
  const messages = [...state.arenaContext, userTurn($("arena-message").value, $("arena-input").value)];
  const settings = { temperature: Number($("arena-temperature").value), max_tokens: Number($("arena-max-tokens").value) };
  showError("");
  setBusy("arena", true);
  const columns = models.map((model) => {
    const column = element("div", "column");
    column.dataset.model = model;
    const answer = element("div", "answer");
    const meta = element("div", "meta", "waiting…");
    column.append(element("h3", "", model), answer, meta);
    return { model, column, answer, meta };
  });
  $("arena-answers").replaceChildren(...columns.map((c) => c.column));
  const results = await Promise.allSettled(columns.map(({ model, answer }) =>
    streamChat(model, messages, settings, (text) => { answer.textContent = text; })));
  results.forEach((result, index) => {
    const { column, meta } = columns[index];
    if (result.status === "fulfilled") {
      meta.textContent = speed(result.value);
      column.dataset.done = "true";
    } else {
      meta.textContent = result.reason.message;
      meta.classList.add("error");
      showError(`${columns[index].model}: ${result.reason.message}`);
    }
  });
  setBusy("arena", false);
}

async function showHeldout() {
  const model = $("arena-heldout-model").value;
  $("arena-heldout").replaceChildren();
  if (!model) return;
  try {
    const body = await (await api(`/ui/api/heldout?model=${encodeURIComponent(model)}`)).json();
    if (!body.rows.length) {
      $("arena-heldout").append(element("li", "hint", "no held-out rows: not a model of a convobot run"));
      return;
    }
    $("arena-heldout").replaceChildren(...body.rows.map((row) => {
      const last = row.messages.at(-1);
      const item = element("li", "", last.content + (last.input ? ` | ${last.input}` : ""));
      item.addEventListener("click", () => useHeldout(row));
      return item;
    }));
  } catch (err) {
    showError(err.message);
  }
}

function forgetHeldout() {
  if ($("arena-message").value === state.heldoutMessage) return;
  state.arenaContext = [];
  state.heldoutMessage = undefined;
  $("arena-reference").hidden = true;
}

function useHeldout(row) {
  const last = row.messages.at(-1);
  state.arenaContext = row.messages.slice(0, -1);
  state.heldoutMessage = last.content;
  $("arena-message").value = last.content;
  $("arena-input").value = last.input || "";
  $("arena-reference").textContent = `Reference: ${row.reference}`;
  $("arena-reference").hidden = false;
}

// ----------------------------------------------------------------------------- runs

const RUN_COLUMNS = ["run", "stage", "method", "trainable_params", "eval_loss", "eval_perplexity", "exact_match",
  "bleu", "rougeL", "reward_accuracy", "reward", "status"];

function loadReports() {
  state.loadingReports ??= fetchReports().finally(() => { state.loadingReports = undefined; });
  return state.loadingReports;
}

async function fetchReports() {
  try {
    const body = await (await api("/ui/api/reports")).json();
    state.reports = body.reports;
    $("runs-report").replaceChildren(...body.reports.map((report) =>
      new Option(`${report.title} · ${report.folder}`, report.index)));
    if (body.reports.length) await showReport();
    else $("runs-title").textContent = "No reports: start the server with reports=[DIR,...]";
  } catch (err) {
    showError(err.message);
  }
}

async function showReport() {
  const report = state.reports[Number($("runs-report").value)];
  $("runs-title").textContent = report.error || report.title;
  showError(report.error || "");
  const columns = RUN_COLUMNS.filter((name) => report.rows.some((row) => row[name]));
  const head = element("tr");
  ["", ...columns].forEach((name) => head.append(element("th", "", name)));
  const rows = report.rows.map((row) => {
    const line = element("tr");
    const load = element("button", "", "Load into arena");
    load.addEventListener("click", () => loadIntoArena(row.path, load));
    const cell = element("td");
    if (row.path && row.status === "finished") cell.append(load);
    line.append(cell);
    columns.forEach((name) => line.append(element("td", "", row[name] ?? "")));
    return line;
  });
  $("runs-table").replaceChildren(head, ...rows);
  $("runs-answers").hidden = !report.answers;
  $("runs-answers-frame").hidden = true;
  $("runs-plots").replaceChildren();
  const images = [];
  for (const plot of report.plots) {
    const blob = await (await api(`/ui/api/reports/${report.index}/${plot}`)).blob();
    images.push(Object.assign(document.createElement("img"), { src: URL.createObjectURL(blob), alt: plot }));
  }
  $("runs-plots").replaceChildren(...images); // whole: a report chosen again meanwhile replaces them, never adds
}

async function showAnswers() {
  const report = state.reports[Number($("runs-report").value)];
  const frame = $("runs-answers-frame");
  frame.srcdoc = await (await api(`/ui/api/reports/${report.index}/answers.html`)).text();
  frame.hidden = false;
}

async function loadIntoArena(path, button) {
  button.disabled = true;
  button.textContent = "Loading…";
  try {
    const body = await (await api("/ui/api/load", { method: "POST", body: JSON.stringify({ path }) })).json();
    await loadModels();
    const box = document.querySelector(`#arena-models input[value="${CSS.escape(body.id)}"]`);
    const chosen = document.querySelectorAll("#arena-models input:checked").length;
    if (box && !box.checked && chosen >= 4) {
      showError(`${body.id} is served; 4 models are chosen already: untick one to compare it`);
    } else if (box && !box.checked) {
      box.checked = true;
      limitArena();
    }
    showTab("arena");
  } catch (err) {
    showError(err.message);
  } finally {
    button.disabled = false;
    button.textContent = "Load into arena";
  }
}

// ----------------------------------------------------------------------------- the page

function showTab(name) {
  document.querySelectorAll(".tab").forEach((tab) => tab.classList.toggle("active", tab.dataset.tab === name));
  document.querySelectorAll(".panel").forEach((panel) => { panel.hidden = panel.id !== name; });
  if (name === "runs" && !state.reports) loadReports();
}

document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => showTab(tab.dataset.tab)));
$("api-key").value = apiKey();
$("api-key").addEventListener("change", async () => {
  localStorage.setItem("convobot.apiKey", $("api-key").value.trim());
  state.reports = undefined;
  await loadModels();
  if (!$("runs").hidden) loadReports();
});
for (const [box, form] of [["chat-message", "chat-form"], ["chat-input", "chat-form"],
  ["arena-message", "arena-form"], ["arena-input", "arena-form"]]) {
  $(box).addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $(form).requestSubmit();
  });
}
$("arena-message").addEventListener("input", forgetHeldout);
$("chat-form").addEventListener("submit", sendChat);
$("chat-regenerate").addEventListener("click", regenerate);
$("chat-reset").addEventListener("click", () => { state.chat = []; renderChat(); showError(""); });
$("arena-form").addEventListener("submit", sendArena);
$("arena-heldout-model").addEventListener("change", showHeldout);
$("runs-report").addEventListener("change", showReport);
$("runs-answers").addEventListener("click", showAnswers);
loadModels();

// agentd's web UI: tasks, sandboxes and images over agentd's own API, with the session cookie
// the login set. No framework, no build: plain ES modules. Everything the API returns is put
// into the page as text (textContent), never as HTML.
import { showDiff } from "/ui/diff.js";

const main = document.getElementById("main");
const logoutButton = document.getElementById("logout");
let cleanup = [];
// Which route is current: a view that awaited before drawing checks it is still wanted.
let routeGen = 0;

// ---- small helpers ---------------------------------------------------------------------

/** An element: `h("a", {href: "#/x", onclick: f}, "text", child)`. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function toast(message, error = false) {
  const box = document.getElementById("toast");
  const d = h("div", { class: error ? "error" : "" }, message);
  box.append(d);
  setTimeout(() => d.remove(), error ? 9000 : 4000);
}

function badge(state) {
  return h("span", { class: `state ${state}` }, state || "?");
}

// A live sandbox's state, saying also whether it is paused or its OpenCode sleeps.
function sandboxState(s) {
  return s.hibernated ? "hibernated" : s.paused ? "paused" : s.state;
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "";
}

function elapsed(from, to) {
  if (!from) return "";
  const s = Math.max(0, Math.round(((to || Date.now()) - from) / 1000));
  return s < 90 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}

function every(ms, f) {
  let busy = false;
  const t = setInterval(async () => {
    if (busy) return;
    busy = true;
    try { await f(); } catch (e) { /* shown by the next successful load */ } finally { busy = false; }
  }, ms);
  cleanup.push(() => clearInterval(t));
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "timed_out"]);

class LoginNeeded extends Error {}

/** Calls agentd's API; JSON in and out. A change carries the CSRF header. */
async function api(method, path, body, opts = {}) {
  const headers = { "X-Agentd-CSRF": "1" };
  let payload = body;
  if (body instanceof Blob) {
    headers["Content-Type"] = opts.type || "application/octet-stream";
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers, body: payload, credentials: "same-origin", signal: opts.signal });
  if (r.status === 401) {
    showLogin();
    throw new LoginNeeded("log in first");
  }
  if (opts.raw) return r;
  const text = await r.text();
  let v = null;
  try { v = text ? JSON.parse(text) : null; } catch { v = null; }
  if (!r.ok) throw new Error((v && v.error && v.error.message) || text || r.statusText);
  return v;
}

/** Runs `f`, showing its error as a toast. */
async function act(f) {
  try { return await f(); } catch (e) {
    if (!(e instanceof LoginNeeded)) toast(String(e.message || e), true);
    return undefined;
  }
}

/** Reads a streamed NDJSON response line by line. */
async function ndjson(response, onLine) {
  const reader = response.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (line) { try { onLine(JSON.parse(line)); } catch { /* not JSON */ } }
    }
  }
}

async function openOrigin(sandbox, port) {
  const q = port ? `?port=${port}` : "";
  const t = await act(() => api("POST", `/v1/sandboxes/${sandbox}/tickets${q}`));
  if (t && t.url) window.open(t.url, "_blank", "noopener");
  else if (t) toast("agentd has no TCP listener to open it on", true);
}

// ---- login -------------------------------------------------------------------------------

function showLogin() {
  cleanup.forEach((f) => f());
  cleanup = [];
  logoutButton.hidden = true;
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "current-password", required: true, size: 40 });
  const form = h("form", { class: "card" },
    h("label", { for: "token" }, "API token"),
    h("div", { class: "row" }, input, h("button", { type: "submit" }, "Log in")),
    h("p", { class: "muted" }, "agentd's token is in its token_file (by default /var/lib/agentd/api-token). On agentd's host, ",
      h("code", {}, "agentd ui"), " prints a one-time login link instead."));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await fetch("/ui/login", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token: input.value }) });
    if (r.ok) {
      // A changed hash routes by itself.
      if (location.hash === "#/tasks") route(); else location.hash = "#/tasks";
    } else { toast("That is not agentd's token.", true); input.select(); }
  });
  main.replaceChildren(h("h1", {}, "Log in to agentd"), form);
  input.focus();
}

logoutButton.addEventListener("click", async () => {
  await fetch("/ui/logout", { method: "POST" });
  showLogin();
});

// ---- tasks -------------------------------------------------------------------------------

async function tasksView() {
  const tbody = h("tbody");
  main.append(
    h("div", { class: "row spread" }, h("h1", {}, "Tasks"), h("a", { class: "button", href: "#/new" }, "New task")),
    h("table", {}, h("caption", { class: "sr-only" }, "Tasks, newest first"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Task"), h("th", { scope: "col" }, "State"),
        h("th", { scope: "col" }, "Prompt"), h("th", { scope: "col" }, "Agents"), h("th", { scope: "col" }, "Created"))),
      tbody));
  async function load() {
    const v = await api("GET", "/v1/tasks");
    const tasks = (v.tasks || []).slice().sort((a, b) => b.created_at - a.created_at);
    tbody.replaceChildren(...tasks.map((t) => h("tr", {},
      h("td", {}, h("a", { href: `#/tasks/${t.id}` }, t.id)),
      h("td", {}, badge(t.state)),
      h("td", { class: "prompt", title: t.prompt }, t.prompt),
      h("td", {}, t.agents),
      h("td", {}, when(t.created_at)))));
    if (tasks.length === 0) tbody.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No tasks yet.")));
  }
  await load();
  every(3000, load);
}

/** The files of a zip archive as [{path, file}] (stored and deflated entries; a single
 * top-level folder, as in a repository's download, is removed from the paths). */
async function filesOfZip(zip) {
  const buf = new Uint8Array(await zip.arrayBuffer());
  const dv = new DataView(buf.buffer);
  let end = -1;
  for (let i = buf.length - 22; i >= Math.max(0, buf.length - 65557); i--) {
    if (dv.getUint32(i, true) === 0x06054b50) { end = i; break; }
  }
  if (end < 0) throw new Error(`${zip.name} is not a zip archive`);
  const count = dv.getUint16(end + 10, true);
  let at = dv.getUint32(end + 16, true);
  if (count === 0xffff || at === 0xffffffff) throw new Error("zip64 archives are not supported: use a tar");
  const dec = new TextDecoder();
  const out = [];
  for (let k = 0; k < count; k++) {
    if (dv.getUint32(at, true) !== 0x02014b50) throw new Error("a broken zip directory");
    const method = dv.getUint16(at + 10, true);
    const size = dv.getUint32(at + 20, true);
    const nameLen = dv.getUint16(at + 28, true);
    const extraLen = dv.getUint16(at + 30, true);
    const commentLen = dv.getUint16(at + 32, true);
    const mode = dv.getUint32(at + 38, true) >>> 16;
    const local = dv.getUint32(at + 42, true);
    const name = dec.decode(buf.subarray(at + 46, at + 46 + nameLen));
    at += 46 + nameLen + extraLen + commentLen;
    // Directories come with their files; links are left out.
    if (name.endsWith("/") || (mode & 0o170000) === 0o120000) continue;
    if (name.split("/").some((c) => c === "..") || name.startsWith("/")) throw new Error(`${name}: a path outside the workspace`);
    const start = local + 30 + dv.getUint16(local + 26, true) + dv.getUint16(local + 28, true);
    const raw = buf.subarray(start, start + size);
    let data;
    if (method === 0) data = raw;
    else if (method === 8) data = new Uint8Array(await new Response(new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate-raw"))).arrayBuffer());
    else throw new Error(`${name}: compression method ${method} is not supported`);
    out.push({ path: name, file: new Blob([data]) });
  }
  const tops = new Set(out.map((f) => f.path.split("/")[0]));
  if (tops.size === 1 && out.every((f) => f.path.includes("/"))) {
    for (const f of out) f.path = f.path.slice(f.path.indexOf("/") + 1);
  }
  return out;
}

/** A ustar archive of `files` ([{path, file}]) for an upload. */
async function tarOf(files) {
  const enc = new TextEncoder();
  const parts = [];
  const put = (buf, off, s, len) => { const b = enc.encode(s); buf.set(b.subarray(0, len), off); };
  const octal = (n, len) => n.toString(8).padStart(len - 1, "0") + "\0";
  for (const { path, file } of files) {
    const data = new Uint8Array(await file.arrayBuffer());
    const hdr = new Uint8Array(512);
    let name = path;
    let prefix = "";
    if (enc.encode(name).length > 100) {
      const i = name.lastIndexOf("/", name.length - 1);
      prefix = name.slice(0, i);
      name = name.slice(i + 1);
      if (enc.encode(name).length > 100 || enc.encode(prefix).length > 155) throw new Error(`${path}: the path is too long`);
    }
    put(hdr, 0, name, 100);
    put(hdr, 100, "0000644\0", 8);
    put(hdr, 108, "0000000\0", 8);
    put(hdr, 116, "0000000\0", 8);
    put(hdr, 124, octal(data.length, 12), 12);
    put(hdr, 136, octal(Math.floor((file.lastModified || Date.now()) / 1000), 12), 12);
    put(hdr, 148, "        ", 8);
    hdr[156] = 48; // '0': a regular file
    put(hdr, 257, "ustar\0", 6);
    put(hdr, 263, "00", 2);
    put(hdr, 345, prefix, 155);
    let sum = 0;
    for (const b of hdr) sum += b;
    put(hdr, 148, sum.toString(8).padStart(6, "0") + "\0 ", 8);
    parts.push(hdr, data);
    const pad = (512 - (data.length % 512)) % 512;
    if (pad) parts.push(new Uint8Array(pad));
  }
  parts.push(new Uint8Array(1024));
  return new Blob(parts, { type: "application/x-tar" });
}

function field(id, label, input, hint) {
  input.id = id;
  return h("div", {}, h("label", { for: id }, label), input, hint ? h("div", { class: "muted" }, hint) : null);
}

async function newTaskView() {
  const prompt = h("textarea", { name: "prompt", required: true, placeholder: "What should the agents do?" });
  const source = h("select", {}, h("option", { value: "git" }, "A git repository"), h("option", { value: "folder" }, "A folder from this computer"), h("option", { value: "tar" }, "A tar or zip archive"));
  const gitUrl = h("input", { type: "url", placeholder: "https://example.org/repo.git", size: 50 });
  const gitRef = h("input", { placeholder: "main" });
  const folder = h("input", { type: "file", webkitdirectory: true, multiple: true });
  const tar = h("input", { type: "file", accept: ".tar,.zip,application/x-tar,application/zip" });
  const gitBox = h("div", { class: "grid2" }, field("git-url", "Repository URL", gitUrl), field("git-ref", "Branch, tag or commit", gitRef, "Empty: the default branch."));
  const folderBox = h("div", { hidden: true }, field("folder", "Folder", folder, "Uploaded to agentd as a tar (.git included)."));
  const tarBox = h("div", { hidden: true }, field("tar", "Archive", tar, "A .tar as is; a .zip is unpacked here and sent as a tar."));
  source.addEventListener("change", () => {
    gitBox.hidden = source.value !== "git";
    folderBox.hidden = source.value !== "folder";
    tarBox.hidden = source.value !== "tar";
  });
  const agents = h("input", { type: "number", min: 1, max: 16, value: 2 });
  const image = h("input", { placeholder: "opencode" });
  const check = h("input", { placeholder: "make test", size: 40 });
  const rounds = h("input", { type: "number", min: 1, max: 20, placeholder: "3" });
  const setup = h("input", { placeholder: "npm ci", size: 40 });
  const timeout = h("input", { type: "number", min: 1, placeholder: "3600" });
  const network = h("select", {}, h("option", { value: "" }, "none (only the LLM)"), h("option", { value: "allowlist" }, "allowlist"), h("option", { value: "open" }, "open"));
  const allow = h("input", { placeholder: "pypi.org, *.npmjs.org", size: 40 });
  const perm = (tool) => h("select", { "data-tool": tool }, ...["default", "allow", "ask", "deny"].map((p) => h("option", { value: p === "default" ? "" : p }, p)));
  const perms = ["bash", "edit", "webfetch"].map((t) => [t, perm(t)]);
  const submit = h("button", { type: "submit" }, "Start the task");
  const status = h("p", { role: "status", class: "muted" });
  const form = h("form", { class: "card" },
    field("prompt", "Prompt", prompt),
    h("fieldset", {}, h("legend", {}, "Workspace"), field("source", "From", source), gitBox, folderBox, tarBox),
    h("fieldset", {}, h("legend", {}, "Agents and checks"),
      h("div", { class: "grid2" }, field("agents", "Agents in parallel", agents), field("image", "Image", image, "Empty: opencode."),
        field("check", "Check command", check, "Run in /workspace after each round; exit 0 passes."), field("rounds", "Most rounds", rounds),
        field("setup", "Setup command", setup, "Run once before the agents start."), field("timeout", "Time limit, seconds", timeout))),
    h("fieldset", {}, h("legend", {}, "Network and permissions"),
      h("div", { class: "grid2" }, field("network", "Network", network), field("allow", "Allowed hosts (allowlist)", allow),
        ...perms.map(([t, s]) => field(`perm-${t}`, `Tool ${t}`, s, "ask: the agent waits for your answer here.")))),
    h("div", { class: "row" }, submit, status));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    submit.disabled = true;
    await act(async () => {
      const workspace = {};
      if (source.value === "git") {
        if (!gitUrl.value) throw new Error("give the repository's URL");
        workspace.git = gitUrl.value.trim();
        if (gitRef.value.trim()) workspace.ref = gitRef.value.trim();
      } else {
        let blob;
        if (source.value === "folder") {
          const files = [...folder.files].map((f) => ({ path: f.webkitRelativePath.split("/").slice(1).join("/"), file: f })).filter((f) => f.path);
          if (files.length === 0) throw new Error("choose a folder");
          status.textContent = `Packing ${files.length} files…`;
          blob = await tarOf(files);
        } else {
          const f = tar.files[0];
          if (!f) throw new Error("choose a tar or zip archive");
          if (f.name.toLowerCase().endsWith(".zip")) {
            status.textContent = "Unpacking the zip…";
            blob = await tarOf(await filesOfZip(f));
          } else {
            blob = f;
          }
        }
        status.textContent = `Uploading ${Math.round(blob.size / 1024)} KiB…`;
        const up = await api("POST", "/v1/workspaces", blob, { type: "application/x-tar" });
        workspace.upload = up.upload;
      }
      const body = { prompt: prompt.value, workspace, agents: Number(agents.value) || 1 };
      if (image.value.trim()) body.image = image.value.trim();
      if (check.value.trim()) body.check = check.value.trim();
      if (rounds.value) body.max_rounds = Number(rounds.value);
      if (setup.value.trim()) body.setup = setup.value.trim();
      if (timeout.value) body.timeout_secs = Number(timeout.value);
      if (network.value) {
        body.network = { mode: network.value };
        const hosts = allow.value.split(",").map((s) => s.trim()).filter(Boolean);
        if (network.value === "allowlist") body.network.allow = hosts;
      }
      const p = {};
      for (const [t, s] of perms) if (s.value) p[t] = s.value;
      if (Object.keys(p).length) body.permissions = p;
      status.textContent = "Starting…";
      const t = await api("POST", "/v1/tasks", body);
      location.hash = `#/tasks/${t.id}`;
    });
    status.textContent = "";
    submit.disabled = false;
  });
  main.append(h("h1", {}, "New task"), form);
}

async function taskView(id) {
  const title = h("h1", {}, `Task ${id} `);
  const stateSlot = h("span");
  title.append(stateSlot);
  const promptBox = h("p");
  const meta = h("p", { class: "muted" });
  const cancel = h("button", { type: "button", class: "quiet", onclick: () => act(async () => { await api("POST", `/v1/tasks/${id}/cancel`); toast("Cancelling."); }) }, "Cancel");
  const del = h("button", { type: "button", class: "danger", onclick: () => act(async () => {
    if (!confirm(`Delete task ${id}, its sandboxes and its results?`)) return;
    await api("DELETE", `/v1/tasks/${id}`);
    location.hash = "#/tasks";
  }) }, "Delete");
  const approvalsBox = h("section", { "aria-label": "Waiting for you", hidden: true });
  const attemptsBox = h("div", { class: "attempts" });
  const resultsBox = h("section", { "aria-label": "Results", hidden: true });
  main.append(title, promptBox, meta, h("div", { class: "row" }, cancel, del), approvalsBox,
    h("h2", {}, "Attempts"), attemptsBox, resultsBox);
  const cards = new Map();
  let task = null;
  let resultsShown = false;

  function card(n) {
    if (cards.has(n)) return cards.get(n);
    const c = {
      badge: h("span"),
      meta: h("div", { class: "muted" }),
      links: h("div", { class: "row" }),
      transcript: h("pre", { class: "transcript", role: "log", "aria-label": `What attempt ${n}'s agent wrote`, tabindex: 0 }),
      tools: h("div", { role: "group", "aria-label": `Tool calls of attempt ${n}` }),
      check: h("div"),
      error: h("p", { class: "muted" }),
    };
    const text = h("textarea", { id: `say-${n}`, rows: 2 });
    const send = h("button", { type: "submit" }, "Send");
    const form = h("form", {}, h("label", { for: `say-${n}` }, `Tell attempt ${n}'s agent`), text, h("div", { class: "row" }, send));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      if (!text.value.trim()) return;
      const r = await act(() => api("POST", `/v1/tasks/${id}/attempts/${n}/messages`, { text: text.value }));
      if (r) {
        text.value = "";
        toast(r.reopened ? `Attempt ${n} runs again for your message.` : `Attempt ${n}'s agent gets it when its turn ends.`);
        startEvents();
      }
    });
    c.root = h("article", { class: "card", "aria-label": `Attempt ${n}` },
      h("div", { class: "row spread" }, h("h3", {}, `Attempt ${n}`), c.badge), c.meta, c.links,
      c.transcript, h("h4", {}, "Tool calls"), c.tools, c.check, c.error, form);
    attemptsBox.append(c.root);
    cards.set(n, c);
    return c;
  }

  function render() {
    stateSlot.replaceChildren(badge(task.state));
    promptBox.textContent = task.prompt;
    meta.textContent = `${task.agents} agent${task.agents === 1 ? "" : "s"} · image ${task.image} · ${task.check ? `check: ${task.check}` : "no check"} · ${elapsed(task.started_at, task.finished_at)}`;
    cancel.hidden = TERMINAL.has(task.state);
    for (const a of task.attempts || []) {
      const c = card(a.attempt);
      c.badge.replaceChildren(badge(a.state));
      c.meta.textContent = `round ${a.round} · ${a.tool_calls} tool calls · ${elapsed(a.started_at, a.finished_at)}${a.waited_ms ? ` · waited ${Math.round(a.waited_ms / 1000)} s for you` : ""}`;
      if (a.sandbox && !c.links.childElementCount) {
        c.links.append(
          h("button", { type: "button", class: "quiet", onclick: () => openOrigin(a.sandbox) }, "Open OpenCode"),
          h("a", { class: "button quiet", href: `#/sandboxes/${a.sandbox}/terminal` }, "Terminal"));
      }
      c.check.replaceChildren();
      if (a.check) {
        c.check.append(h("details", {}, h("summary", {}, a.check.passed ? `Check passed (round ${a.check.round})` : `Check failed (round ${a.check.round}, exit ${a.check.exit_code})`),
          h("pre", {}, a.check.output || "")));
      }
      c.error.textContent = a.error || a.note || "";
    }
    if (TERMINAL.has(task.state) && !resultsShown) {
      resultsShown = true;
      showResults();
    } else if (!TERMINAL.has(task.state) && resultsShown) {
      resultsShown = false;
      resultsBox.hidden = true;
    }
  }

  async function load() {
    task = await api("GET", `/v1/tasks/${id}`);
    render();
  }

  async function loadApprovals() {
    if (task && TERMINAL.has(task.state)) { approvalsBox.hidden = true; return; }
    const v = await api("GET", `/v1/tasks/${id}/approvals`);
    const list = v.approvals || [];
    approvalsBox.hidden = list.length === 0;
    approvalsBox.replaceChildren(h("h2", {}, "Waiting for you"), ...list.map((a) => {
      const answer = (reply) => act(async () => {
        await api("POST", `/v1/tasks/${id}/approvals/${encodeURIComponent(a.id)}`, { reply });
        toast(`Answered: ${reply}.`);
        await loadApprovals();
      });
      // A spent budget asks for more, not for a tool.
      const budget = a.permission === "budget";
      const label = budget ? `Attempt ${a.attempt} spent its budget` : `Attempt ${a.attempt} asks to use ${a.permission}`;
      return h("div", { class: "card approval", role: "group", "aria-label": label },
        budget ? h("p", {}, label, ":") : h("p", {}, `Attempt ${a.attempt} asks to use `, h("strong", {}, a.permission), ":"),
        h("pre", {}, (a.patterns || []).join("\n")),
        h("div", { class: "row" },
          h("button", { type: "button", onclick: () => answer("once") }, budget ? "Give one more budget" : "Allow once"),
          h("button", { type: "button", class: "quiet", onclick: () => answer("always") }, budget ? "No limit" : "Allow always"),
          h("button", { type: "button", class: "danger", onclick: () => answer("reject") }, budget ? "Stop the attempt" : "Reject")));
    }));
  }

  async function showResults() {
    const r = await act(() => api("GET", `/v1/tasks/${id}/result`));
    if (!r) return;
    const viewer = h("div", { role: "region", "aria-label": "Diff" });
    const items = r.attempts.map((a) => {
      const d = a.diff;
      const summary = d ? `+${d.additions} −${d.deletions} in ${d.files} file${d.files === 1 ? "" : "s"}` : "no diff";
      const apply = `agentd task apply ${id} ${a.attempt}`;
      return h("li", { class: "card" },
        h("div", { class: "row spread" }, h("strong", {}, `#${a.rank} · attempt ${a.attempt}`), badge(a.state)),
        h("p", {}, summary, a.check ? (a.check.passed ? " · check passed" : " · check failed") : ""),
        a.final_message ? h("details", {}, h("summary", {}, "The agent's last message"), h("pre", {}, a.final_message)) : null,
        h("div", { class: "row" },
          a.has_patch ? h("button", { type: "button", onclick: () => act(async () => {
            const resp = await api("GET", `/v1/tasks/${id}/attempts/${a.attempt}/diff`, undefined, { raw: true });
            showDiff(viewer, await resp.text());
            viewer.scrollIntoView({ block: "start" });
          }) }, `View the diff of attempt ${a.attempt}`) : null,
          a.has_patch ? h("a", { class: "button quiet", href: `/v1/tasks/${id}/attempts/${a.attempt}/patch`, download: `agentd-${id}-${a.attempt}.patch` }, "Download patch") : null,
          a.has_patch ? h("button", { type: "button", class: "quiet", onclick: async () => {
            try { await navigator.clipboard.writeText(apply); toast(`Copied: ${apply}`); } catch { toast(apply); }
          } }, "Copy the apply command") : null),
        a.has_patch ? h("code", {}, apply) : null);
    });
    resultsBox.hidden = false;
    resultsBox.replaceChildren(h("h2", {}, "Results, best first"), h("ol", { class: "attempts", style: "list-style:none;padding:0" }, ...items), viewer);
  }

  let source = null;
  let lastEvent = 0;
  let reload = null;
  function soon() {
    if (reload) return;
    reload = setTimeout(async () => { reload = null; await act(load); await act(loadApprovals); }, 300);
  }
  function onEvent(ev) {
    let e;
    try { e = JSON.parse(ev.data); } catch { return; }
    lastEvent = Math.max(lastEvent, e.id || 0);
    const c = e.attempt ? card(e.attempt) : null;
    switch (e.type) {
      case "text":
        if (c) { c.transcript.append(e.text); c.transcript.scrollTop = c.transcript.scrollHeight; }
        break;
      case "tool":
        if (c && e.output !== undefined) {
          c.tools.append(h("details", {}, h("summary", {}, `${e.tool}: ${e.title || ""} [${e.status}]`),
            h("pre", {}, typeof e.input === "string" ? e.input : JSON.stringify(e.input, null, 2)),
            h("pre", {}, e.output || "")));
        }
        break;
      case "approval":
        soon();
        break;
      case "task.finished":
        soon();
        if (source) { source.close(); source = null; }
        break;
      default:
        if (["attempt.state", "task.state", "check", "attempt.sandbox", "diff", "follow_up"].includes(e.type)) soon();
    }
  }
  function startEvents() {
    if (source) return;
    source = new EventSource(`/v1/tasks/${id}/events?after=${lastEvent}`);
    source.onmessage = onEvent;
    for (const k of ["text", "tool", "approval", "task.finished", "attempt.state", "task.state", "check", "attempt.sandbox", "diff", "follow_up", "message", "prompt", "error", "setup"]) {
      source.addEventListener(k, onEvent);
    }
  }
  cleanup.push(() => { if (source) source.close(); if (reload) clearTimeout(reload); });
  await load();
  await act(loadApprovals);
  startEvents();
  every(2000, async () => { if (!TERMINAL.has(task.state)) { await load(); await loadApprovals(); } });
}

// ---- sandboxes ---------------------------------------------------------------------------

async function sandboxesView() {
  const tbody = h("tbody");
  const image = h("input", { placeholder: "opencode" });
  const name = h("input", { placeholder: "optional" });
  const memory = h("input", { placeholder: "2g", size: 6 });
  const opencode = h("input", { type: "checkbox", checked: true });
  const form = h("form", { class: "card" }, h("h2", {}, "New sandbox"),
    h("div", { class: "grid2" }, field("sb-image", "Image", image), field("sb-name", "Name", name), field("sb-memory", "Memory", memory)),
    h("div", { class: "row" }, opencode, h("label", { for: "sb-opencode", style: "display:inline;margin:0" }, "Run OpenCode in it")),
    h("p", {}, h("button", { type: "submit" }, "Create")));
  opencode.id = "sb-opencode";
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = { image: image.value.trim() || "opencode", opencode: opencode.checked };
    if (name.value.trim()) body.name = name.value.trim();
    if (memory.value.trim()) body.limits = { memory: memory.value.trim() };
    const s = await act(() => api("POST", "/v1/sandboxes", body));
    if (s) location.hash = `#/sandboxes/${s.id}`;
  });
  main.append(h("h1", {}, "Sandboxes"),
    h("table", {}, h("caption", { class: "sr-only" }, "Sandboxes"),
      h("thead", {}, h("tr", {}, ...["Sandbox", "Name", "Image", "State", "Created"].map((t) => h("th", { scope: "col" }, t)))), tbody),
    form);
  async function load() {
    const v = await api("GET", "/v1/sandboxes");
    const list = (v.sandboxes || []).slice().sort((a, b) => b.created_at - a.created_at);
    tbody.replaceChildren(...list.map((s) => h("tr", {},
      h("td", {}, h("a", { href: `#/sandboxes/${s.id}` }, s.id)), h("td", {}, s.name || ""), h("td", {}, s.image),
      h("td", {}, badge(sandboxState(s))), h("td", {}, when(s.created_at)))));
    if (list.length === 0) tbody.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No sandboxes.")));
  }
  await load();
  every(3000, load);
}

function chart(label) {
  const canvas = h("canvas", { class: "chart", role: "img", "aria-label": label, width: 600, height: 90 });
  const value = h("span", { class: "muted" });
  const points = [];
  return {
    root: h("div", {}, h("div", { class: "row spread" }, h("strong", {}, label), value), canvas),
    push(v, text) {
      points.push(v);
      if (points.length > 60) points.shift();
      value.textContent = text;
      canvas.setAttribute("aria-label", `${label}: ${text}`);
      const ctx = canvas.getContext("2d");
      const W = canvas.width;
      const H = canvas.height;
      ctx.clearRect(0, 0, W, H);
      const max = Math.max(...points, 1e-9);
      ctx.strokeStyle = getComputedStyle(document.body).getPropertyValue("--accent") || "#2952cc";
      ctx.lineWidth = 2;
      ctx.beginPath();
      // One sample is a level line until the next.
      const shown = points.length === 1 ? [points[0], points[0]] : points;
      shown.forEach((p, i) => {
        const x = (i / Math.max(shown.length - 1, 59)) * (W - 4) + 2;
        const y = H - 4 - (p / max) * (H - 8);
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
    },
  };
}

function openTerminal(id, box) {
  if (!window.Terminal) { toast("the terminal library did not load", true); return; }
  box.replaceChildren();
  const term = new window.Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
  const fit = window.FitAddon ? new window.FitAddon.FitAddon() : null;
  if (fit) term.loadAddon(fit);
  const el = h("div", { class: "term" });
  box.append(el);
  term.open(el);
  if (fit) fit.fit();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/v1/sandboxes/${id}/exec/ws`);
  ws.binaryType = "arraybuffer";
  const enc = new TextEncoder();
  ws.onopen = () => ws.send(JSON.stringify({ tty: true, cols: term.cols, rows: term.rows }));
  ws.onmessage = (m) => {
    if (typeof m.data === "string") {
      let v = {};
      try { v = JSON.parse(m.data); } catch { /* ignore */ }
      if (v.error) term.write(`\r\n[${v.error}]\r\n`);
      else if (v.exit_code !== undefined) term.write(`\r\n[exited with status ${v.exit_code}]\r\n`);
    } else {
      term.write(new Uint8Array(m.data));
    }
  };
  ws.onclose = () => term.write("\r\n[disconnected]\r\n");
  term.onData((d) => { if (ws.readyState === 1) ws.send(enc.encode(d)); });
  term.onResize(({ cols, rows }) => { if (ws.readyState === 1) ws.send(JSON.stringify({ resize: { cols, rows } })); });
  const onResize = () => { if (fit) fit.fit(); };
  window.addEventListener("resize", onResize);
  cleanup.push(() => { window.removeEventListener("resize", onResize); ws.close(); term.dispose(); });
  term.focus();
}

async function sandboxView(id, terminalNow = false) {
  const gen = routeGen;
  const s = await api("GET", `/v1/sandboxes/${id}`);
  if (gen !== routeGen) return;
  const title = h("h1", {}, `Sandbox ${s.name || s.id} `, badge(sandboxState(s)));
  const details = h("p", { class: "muted" }, `${s.id} · image ${s.image} · created ${when(s.created_at)} · memory limit ${Math.round((s.limits && s.limits.memory_bytes || 0) / 1048576)} MiB`);
  const actions = h("div", { class: "row" },
    s.opencode ? h("button", { type: "button", class: "quiet", onclick: () => openOrigin(s.id) }, "Open OpenCode") : null,
    h("button", { type: "button", class: "quiet", onclick: () => act(async () => { await api("POST", `/v1/sandboxes/${id}/stop`); toast("Stopped."); }) }, "Stop"),
    h("button", { type: "button", class: "danger", onclick: () => act(async () => {
      if (!confirm(`Delete sandbox ${id}?`)) return;
      await api("DELETE", `/v1/sandboxes/${id}`);
      location.hash = "#/sandboxes";
    }) }, "Delete"));
  const termBox = h("div");
  const listening = h("ul", { "aria-label": "Listening ports" });
  const files = h("div");
  const port = h("input", { type: "number", min: 1, max: 65535, placeholder: "3000", id: "preview-port" });
  const path = h("input", { id: "file-path", value: "/workspace", size: 40 });
  const upload = h("input", { type: "file", id: "file-upload" });
  const cpu = chart("CPU");
  const mem = chart("Memory");
  const pids = chart("Processes");
  const logs = h("pre", { role: "log", "aria-label": "Logs", tabindex: 0 });
  main.append(title, details, actions,
    h("h2", {}, "Terminal"),
    h("div", { class: "row" }, h("button", { type: "button", onclick: () => openTerminal(id, termBox) }, "Open a terminal")), termBox,
    h("h2", {}, "Resources"), h("div", { class: "grid2" }, cpu.root, mem.root, pids.root),
    h("h2", {}, "Preview a port"),
    listening,
    h("div", { class: "row" }, h("label", { for: "preview-port", style: "margin:0" }, "Port"), port,
      h("button", { type: "button", onclick: () => port.value && openOrigin(id, Number(port.value)) }, "Open preview")),
    h("h2", {}, "Files"),
    h("div", { class: "row" }, h("label", { for: "file-path", style: "margin:0" }, "Path"), path,
      h("button", { type: "button", onclick: () => listDir(path.value) }, "List"),
      h("button", { type: "button", class: "quiet", onclick: () => { location.href = `/v1/sandboxes/${id}/files?path=${encodeURIComponent(path.value)}`; } }, "Download"),
      h("label", { for: "file-upload", style: "margin:0" }, "Upload into it"), upload),
    files,
    h("h2", {}, "Logs"), logs);
  async function listDir(dir, quiet = false) {
    const get = () => api("GET", `/v1/sandboxes/${id}/dir?path=${encodeURIComponent(dir)}`);
    // The first listing falls back to / quietly (not every image has /workspace).
    const v = quiet ? await get().catch(() => null) : await act(get);
    if (!v) { if (quiet && dir !== "/") await listDir("/", true); return; }
    path.value = v.path;
    const join = (n) => (v.path.endsWith("/") ? v.path : v.path + "/") + n;
    const up = v.path.replace(/\/[^/]+\/?$/, "") || "/";
    const rows = v.entries.map((en) => h("tr", {},
      h("td", {}, en.kind === "dir"
        ? h("button", { type: "button", class: "quiet", onclick: () => listDir(join(en.name)) }, `${en.name}/`)
        : en.kind === "file"
          ? h("a", { href: `/v1/sandboxes/${id}/files?path=${encodeURIComponent(join(en.name))}`, download: en.name }, en.name)
          : `${en.name} (${en.kind})`),
      h("td", {}, en.kind === "file" ? `${en.size} B` : ""),
      h("td", {}, when(en.mtime * 1000))));
    files.replaceChildren(
      h("table", {}, h("caption", { class: "sr-only" }, `Files in ${v.path}`),
        h("thead", {}, h("tr", {}, ...["Name", "Size", "Changed"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, v.path !== "/" ? h("tr", {}, h("td", { colspan: 3 }, h("button", { type: "button", class: "quiet", onclick: () => listDir(up) }, "Up one level"))) : null, ...rows)),
      ...(v.truncated ? [h("p", { class: "muted" }, "More entries than shown.")] : []));
  }
  upload.addEventListener("change", () => act(async () => {
    const f = upload.files[0];
    if (!f) return;
    const type = f.name.endsWith(".tar") ? "application/x-tar" : "application/octet-stream";
    const dest = f.name.endsWith(".tar") ? path.value : (path.value.endsWith("/") ? path.value : path.value + "/") + f.name;
    await api("PUT", `/v1/sandboxes/${id}/files?path=${encodeURIComponent(dest)}`, f, { type });
    toast(`Uploaded ${f.name}.`);
    await listDir(path.value);
  }));
  async function loadPorts() {
    const v = await api("GET", `/v1/sandboxes/${id}/ports`);
    listening.replaceChildren(...(v.ports || []).map((p) => h("li", {}, `Port ${p.port} `,
      p.loopback_only
        ? h("span", { class: "muted" }, "(listens on the sandbox's loopback only: use ssh -L)")
        : h("button", { type: "button", class: "quiet", onclick: () => openOrigin(id, p.port) }, `Open port ${p.port}`))));
  }
  if (s.state === "ready" || s.state === "starting") {
    act(loadPorts);
    every(5000, loadPorts);
    listDir(path.value, true);
  }
  let last = null;
  every(2000, async () => {
    const st = await api("GET", `/v1/sandboxes/${id}/stats`);
    const now = Date.now();
    if (last) {
      const cores = (st.cpu_usec - last.cpu_usec) / 1000 / (now - last.at);
      cpu.push(cores, `${(cores * 100).toFixed(0)} % of a core`);
    }
    last = { cpu_usec: st.cpu_usec, at: now };
    mem.push(st.memory_bytes, `${(st.memory_bytes / 1048576).toFixed(0)} MiB`);
    pids.push(st.pids, `${st.pids}`);
  });
  const ac = new AbortController();
  cleanup.push(() => ac.abort());
  api("GET", `/v1/sandboxes/${id}/logs?follow=true`, undefined, { raw: true, signal: ac.signal })
    .then((r) => ndjson(r, (l) => { if (l.data) { logs.append(l.data); logs.scrollTop = logs.scrollHeight; } }))
    .catch(() => {});
  if (terminalNow) openTerminal(id, termBox);
}

// ---- images ------------------------------------------------------------------------------

async function imagesView() {
  const tbody = h("tbody");
  const ref = h("input", { id: "pull-ref", placeholder: "docker.io/library/python:3.12", size: 40 });
  const progress = h("p", { role: "status", class: "muted" });
  const form = h("form", { class: "card" }, h("h2", {}, "Pull an image"),
    h("div", { class: "row" }, h("label", { for: "pull-ref", style: "margin:0" }, "Reference"), ref, h("button", { type: "submit" }, "Pull")), progress);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      const r = await api("POST", "/v1/images/pull", { reference: ref.value.trim() }, { raw: true });
      if (!r.ok) throw new Error(await r.text());
      await ndjson(r, (l) => {
        progress.textContent = [l.event, l.layer || l.digest || "", l.message || l.error || ""].filter(Boolean).join(" ");
      });
      await load();
    });
  });
  main.append(h("h1", {}, "Images"),
    h("table", {}, h("caption", { class: "sr-only" }, "Images"),
      h("thead", {}, h("tr", {}, ...["Image", "Size", "Added", ""].map((t) => h("th", { scope: "col" }, t)))), tbody), form);
  async function load() {
    const v = await api("GET", "/v1/images");
    tbody.replaceChildren(...(v.images || []).map((i) => h("tr", {},
      h("td", {}, i.name), h("td", {}, `${(i.size / 1048576).toFixed(0)} MiB`), h("td", {}, when(i.added)),
      h("td", {}, h("button", { type: "button", class: "danger", onclick: () => act(async () => {
        if (!confirm(`Delete image ${i.name}?`)) return;
        await api("DELETE", `/v1/images/${encodeURI(i.name)}`);
        await load();
      }) }, `Delete ${i.name}`)))));
  }
  await load();
}

// ---- routing -----------------------------------------------------------------------------

const ROUTES = [
  [/^#\/tasks\/?$/, tasksView],
  [/^#\/new$/, newTaskView],
  [/^#\/tasks\/([0-9a-z]+)$/, taskView],
  [/^#\/sandboxes\/?$/, sandboxesView],
  [/^#\/sandboxes\/([\w.-]+)\/terminal$/, (id) => sandboxView(id, true)],
  [/^#\/sandboxes\/([\w.-]+)$/, (id) => sandboxView(id, false)],
  [/^#\/images\/?$/, imagesView],
];

async function route() {
  routeGen++;
  cleanup.forEach((f) => f());
  cleanup = [];
  const hash = location.hash || "#/tasks";
  for (const a of document.querySelectorAll("nav a")) {
    if (hash.startsWith(a.getAttribute("href"))) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  main.replaceChildren();
  logoutButton.hidden = false;
  for (const [re, view] of ROUTES) {
    const m = re.exec(hash);
    if (!m) continue;
    try {
      await view(...m.slice(1));
      const h1 = main.querySelector("h1");
      if (h1) document.title = `${h1.textContent.trim()} · agentd`;
    } catch (e) {
      if (!(e instanceof LoginNeeded)) main.append(h("p", { role: "alert" }, String(e.message || e)));
    }
    return;
  }
  main.append(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/tasks" }, "Tasks")));
}

window.addEventListener("hashchange", () => { route(); main.focus({ preventScroll: true }); });
route();

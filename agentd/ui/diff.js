// A unified diff, parsed and shown: a file list, unified or split view, light syntax
// highlighting. Everything from the diff goes into the page as text nodes, never as HTML.

/** Parses `git diff` output into files with hunks. */
export function parseDiff(text) {
  const files = [];
  let file = null;
  let hunk = null;
  let oldN = 0;
  let newN = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith("diff --git ")) {
      const m = / b\/(.*)$/.exec(line);
      file = { name: m ? m[1] : line.slice(11), hunks: [], add: 0, del: 0, binary: false };
      files.push(file);
      hunk = null;
    } else if (!file) {
      continue;
    } else if (line.startsWith("@@")) {
      const m = /^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@(.*)$/.exec(line);
      oldN = m ? Number(m[1]) : 0;
      newN = m ? Number(m[2]) : 0;
      hunk = { header: line, lines: [] };
      file.hunks.push(hunk);
    } else if (line.startsWith("Binary files")) {
      file.binary = true;
    } else if (hunk) {
      const k = line[0];
      if (k === "+") {
        hunk.lines.push({ kind: "add", text: line.slice(1), o: null, n: newN++ });
        file.add++;
      } else if (k === "-") {
        hunk.lines.push({ kind: "del", text: line.slice(1), o: oldN++, n: null });
        file.del++;
      } else if (k === " ") {
        hunk.lines.push({ kind: "ctx", text: line.slice(1), o: oldN++, n: newN++ });
      }
    }
  }
  return files;
}

const KEYWORDS = new Set((
  "fn let mut pub use mod impl struct enum trait match if else for while loop return " +
  "async await const static self Self def class import from as with try except finally " +
  "raise lambda yield function var new this typeof export default case switch break " +
  "continue package func go defer type interface true false None null nil True False"
).split(" "));

/** Appends `text` to `el` with keywords, strings and comments marked (text nodes only). */
function highlight(el, text) {
  const re = /(\/\/.*$|#.*$|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\b[A-Za-z_][A-Za-z0-9_]*\b)/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    if (m.index > last) el.append(text.slice(last, m.index));
    const t = m[0];
    let cls = null;
    if (t.startsWith("//") || t.startsWith("#")) cls = "com";
    else if (t.startsWith('"') || t.startsWith("'")) cls = "str";
    else if (KEYWORDS.has(t)) cls = "kw";
    if (cls) {
      const s = document.createElement("span");
      s.className = cls;
      s.textContent = t;
      el.append(s);
    } else {
      el.append(t);
    }
    last = m.index + t.length;
  }
  if (last < text.length) el.append(text.slice(last));
}

function td(cls, text, hl) {
  const c = document.createElement("td");
  c.className = cls;
  if (text == null) return c;
  if (hl) highlight(c, String(text));
  else c.textContent = String(text);
  return c;
}

/** An empty diff table named for screen readers. */
function diffTable(file, how) {
  const t = document.createElement("table");
  t.className = "diff";
  const cap = document.createElement("caption");
  cap.className = "sr-only";
  cap.textContent = `Changes to ${file.name}, ${how}`;
  t.append(cap);
  return t;
}

function unifiedTable(file) {
  const t = diffTable(file, "unified");
  for (const h of file.hunks) {
    const hr = document.createElement("tr");
    hr.className = "hunk";
    hr.append(td("n", ""), td("n", ""), td("c", h.header));
    t.append(hr);
    for (const l of h.lines) {
      const r = document.createElement("tr");
      r.className = l.kind;
      const sign = l.kind === "add" ? "+" : l.kind === "del" ? "-" : " ";
      r.append(td("n", l.o), td("n", l.n));
      const c = td("c", null);
      c.append(sign);
      highlight(c, l.text);
      r.append(c);
      t.append(r);
    }
  }
  return t;
}

function splitTable(file) {
  const t = diffTable(file, "side by side");
  for (const h of file.hunks) {
    const hr = document.createElement("tr");
    hr.className = "hunk";
    const hc = td("c", h.header);
    hc.colSpan = 4;
    hr.append(hc);
    t.append(hr);
    // Deletions and additions of one run side by side; context on both sides.
    let i = 0;
    while (i < h.lines.length) {
      if (h.lines[i].kind === "ctx") {
        const l = h.lines[i++];
        const r = document.createElement("tr");
        r.append(td("n", l.o), td("c", l.text, true), td("n", l.n), td("c", l.text, true));
        t.append(r);
        continue;
      }
      const dels = [];
      const adds = [];
      while (i < h.lines.length && h.lines[i].kind === "del") dels.push(h.lines[i++]);
      while (i < h.lines.length && h.lines[i].kind === "add") adds.push(h.lines[i++]);
      for (let k = 0; k < Math.max(dels.length, adds.length); k++) {
        const d = dels[k];
        const a = adds[k];
        const r = document.createElement("tr");
        const dc = td("c" + (d ? " del" : ""), d ? d.text : "", true);
        const ac = td("c" + (a ? " add" : ""), a ? a.text : "", true);
        r.append(td("n", d ? d.o : ""), dc, td("n", a ? a.n : ""), ac);
        t.append(r);
      }
    }
  }
  return t;
}

/** A diff viewer for `text` in `root`: file list, unified/split toggle. */
export function showDiff(root, text) {
  root.replaceChildren();
  const files = parseDiff(text);
  if (files.length === 0) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "No changes.";
    root.append(p);
    return;
  }
  let split = false;
  let current = 0;
  const bar = document.createElement("div");
  bar.className = "row";
  const toggle = document.createElement("button");
  toggle.type = "button";
  toggle.className = "quiet";
  toggle.setAttribute("aria-pressed", "false");
  toggle.textContent = "Split view";
  bar.append(toggle);
  const wrap = document.createElement("div");
  wrap.className = "diffwrap";
  const list = document.createElement("nav");
  list.className = "files";
  list.setAttribute("aria-label", "Changed files");
  const ul = document.createElement("ul");
  list.append(ul);
  const view = document.createElement("div");
  view.setAttribute("role", "region");
  view.setAttribute("aria-label", "File changes");
  const buttons = files.map((f, i) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = `${f.name} +${f.add} −${f.del}`;
    b.addEventListener("click", () => { current = i; draw(); });
    li.append(b);
    ul.append(li);
    return b;
  });
  function draw() {
    buttons.forEach((b, i) => b.setAttribute("aria-current", String(i === current)));
    const f = files[current];
    const h = document.createElement("h3");
    h.textContent = f.name;
    view.replaceChildren(h);
    if (f.binary) {
      const p = document.createElement("p");
      p.textContent = "A binary file.";
      view.append(p);
    } else {
      view.append(split ? splitTable(f) : unifiedTable(f));
    }
  }
  toggle.addEventListener("click", () => {
    split = !split;
    toggle.setAttribute("aria-pressed", String(split));
    draw();
  });
  wrap.append(list, view);
  root.append(bar, wrap);
  draw();
}

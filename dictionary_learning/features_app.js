/* Feature browser (python -m dictionary_learning.features): renders window.FB_DATA, which the
   data/*.js files fill. Plain JavaScript: no libraries, no network; works from file://.
   FB.renderCard(container, record, index) draws one latent's card (also used inline in notebooks). */
"use strict";
(function () {
  const FB = (window.FB = window.FB || {});
  const DATA = (window.FB_DATA = window.FB_DATA || {});
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
    return e;
  }

  // 3 significant digits, as stored in the data
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (v === 0) return "0";
    if (Math.abs(v) >= 1000) return String(Math.round(v));
    return String(Number(v.toPrecision(3)));
  }

  function tokenText(s) {
    const t = s.replace(/\r/g, "").replace(/\n/g, "↵").replace(/\t/g, "⇥");
    return t === "" ? "∅" : t;
  }

  function colour(v, max) {
    if (!(v > 0) || !(max > 0)) return "";
    return "rgba(255, 102, 0, " + (0.12 + 0.88 * Math.min(1, v / max)).toFixed(3) + ")";
  }

  // ctx = [window, start, center, values]: values[j] is the activation at window position start + j
  function renderContext(ctx, index, max) {
    const [w, s, c, vals] = ctx;
    const toks = index.windows[w];
    const line = el("div", { class: "ctx" }, el("span", { class: "ctx-val", text: fmt(vals[c - s]) }));
    const body = el("span", { class: "ctx-tokens" });
    vals.forEach((v, j) => {
      const p = s + j;
      const span = el("span", { class: "tok", text: tokenText(index.vocab[toks[p]]) });
      if (v === null) {
        span.classList.add("unscored");
        span.title = "not scored (special token or excluded position)";
      } else {
        span.title = fmt(v);
        const bg = colour(v, max);
        if (bg) {
          span.style.background = bg;
          span.classList.add("on");
        }
      }
      if (p === c) span.classList.add("center");
      body.append(span);
    });
    line.append(body);
    return line;
  }

  function histogram(rec) {
    const { lo, hi, counts } = rec.hist;
    const n = counts.length, top = Math.max(1, ...counts), W = 320, H = 80;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("class", "hist");
    counts.forEach((k, i) => {
      const h = k ? Math.max(1, (k / top) * (H - 2)) : 0;
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("x", ((i * W) / n).toFixed(1));
      r.setAttribute("width", Math.max(0.5, W / n - 1).toFixed(1));
      r.setAttribute("y", (H - h).toFixed(1));
      r.setAttribute("height", h.toFixed(1));
      const t = document.createElementNS(SVG, "title");
      t.textContent = `${fmt(lo + (i * (hi - lo)) / n)} to ${fmt(lo + ((i + 1) * (hi - lo)) / n)}: ${k} tokens`;
      r.append(t);
      svg.append(r);
    });
    return el("figure", { class: "hist-box" }, svg,
      el("figcaption", { text: `non-zero activations, ${fmt(lo)} to ${fmt(hi)}` }));
  }

  function tokenTable(title, pairs, index) {
    const t = el("table", { class: "lens" }, el("caption", { text: title }));
    for (const [tok, v] of pairs) {
      t.append(el("tr", {}, el("td", { class: "tok-cell", text: tokenText(index.vocab[tok]) }),
        el("td", { class: "num", text: fmt(v) })));
    }
    return t;
  }

  FB.renderCard = function (container, rec, index) {
    const N = index.meta.n_tokens, dead = rec.fires === 0;
    const card = el("div", { class: "card" + (dead ? " dead" : "") });
    card.append(el("h2", { text: `Latent ${rec.id}` }, dead ? el("span", { class: "badge", text: "dead" }) : null));
    card.append(el("p", { class: "stats", text: dead
      ? `Never fired on the ${N.toLocaleString()} held-out tokens (density 0).`
      : `Fires on ${rec.fires.toLocaleString()} of ${N.toLocaleString()} held-out tokens: ` +
        `density log10 = ${fmt(rec.density_log10)}; max activation ${fmt(rec.max)}.` }));
    if (!dead) {
      card.append(histogram(rec));
      const top = el("section", { class: "top" }, el("h3", { text: `Top ${rec.top.length} activations` }));
      rec.top.forEach((c) => top.append(renderContext(c, index, rec.max)));
      card.append(top);
      const q = el("section", { class: "bands" }, el("h3", { text: "Samples from lower activation bands" }));
      for (const b of rec.bands) {
        q.append(el("h4", { text: `${b.lo} to ${b.hi} × max (${fmt(b.lo * rec.max)} to ${fmt(b.hi * rec.max)}): ` +
          `${b.count.toLocaleString()} tokens` + (b.samples.length ? `, ${b.samples.length} shown` : "") }));
        b.samples.forEach((c) => q.append(renderContext(c, index, rec.max)));
      }
      card.append(q);
    }
    const lens = el("section", { class: "lens-box" }, el("h3", { text: "Logit lens" }));
    lens.append(el("p", { class: "note", text: `${index.meta.logit_lens.formula}; final norm ${index.meta.logit_lens.final_norm}, gain ${index.meta.logit_lens.gain}` }));
    lens.append(el("div", { class: "cols" }, tokenTable("promoted", rec.logits.promoted, index),
      tokenTable("suppressed", rec.logits.suppressed, index)));
    card.append(lens);
    const sim = el("section", { class: "similar" }, el("h3", { text: "Similar latents (decoder cosine)" }));
    const list = el("ul", {});
    for (const [j, c] of rec.similar) {
      const name = `latent ${j}`;
      list.append(el("li", {}, FB.page ? el("a", { href: `#${j}`, text: name }) : name, ` (${fmt(c)})`));
    }
    sim.append(list);
    card.append(sim);
    container.replaceChildren(card);
  };

  // ------------------------------------------------------------------ the index page

  function loadFile(name, done, fail) {
    if (DATA[name]) return done(DATA[name]);
    const s = document.createElement("script");
    s.src = `data/${name}.js`;
    s.charset = "utf-8";
    s.onload = () => (DATA[name] ? done(DATA[name]) : fail(`data/${name}.js did not define its data`));
    s.onerror = () => fail(`cannot read data/${name}.js`);
    document.head.append(s);
  }

  function initPage() {
    const index = DATA.index, table = document.getElementById("latents");
    FB.page = true;
    const L = index.latents, N = index.meta.n_tokens, card = document.getElementById("card");
    const rows = [], byId = new Map();
    const tbody = table.tBodies[0], frag = document.createDocumentFragment();
    for (let i = 0; i < L.id.length; i++) {
      const dead = L.fires[i] === 0, tt = L.top_tokens[i];
      const r = { id: L.id[i], i, density: dead ? -Infinity : Math.log10(L.fires[i] / N), max: L.max[i],
        top: tt.length ? tokenText(index.vocab[tt[0]]) : "", tokens: tt };
      r.tr = el("tr", { "data-id": String(r.id), class: dead ? "dead" : "" },
        el("td", { class: "num", text: String(r.id) }),
        el("td", { class: "num", text: dead ? "dead" : fmt(r.density) }),
        el("td", { class: "num", text: dead ? "–" : fmt(r.max) }),
        el("td", { class: "tok-cell", text: r.top }));
      rows.push(r);
      byId.set(r.id, r);
      frag.append(r.tr);
    }
    tbody.append(frag);
    const nDead = rows.filter((r) => r.density === -Infinity).length, m = index.meta;
    document.getElementById("meta").textContent = `${m.model}, ${m.hook_name}; SAE ${m.sae}; ` +
      `${L.id.length} of ${m.dict_size} latents (${nDead} dead) on ${N.toLocaleString()} held-out tokens of ${m.dataset}`;

    let sortKey = "id", sortDir = 1;
    function sortBy(key) {
      sortDir = key === sortKey ? -sortDir : key === "id" || key === "top" ? 1 : -1;
      sortKey = key;
      const cmp = key === "top" ? (a, b) => a.top.localeCompare(b.top) : (a, b) => (a[key] > b[key]) - (a[key] < b[key]);
      rows.sort((a, b) => cmp(a, b) * sortDir || a.id - b.id);
      const f = document.createDocumentFragment();
      rows.forEach((r) => f.append(r.tr));
      tbody.append(f);
      for (const th of table.tHead.rows[0].cells) {
        th.setAttribute("aria-sort", th.dataset.key === key ? (sortDir > 0 ? "ascending" : "descending") : "none");
      }
    }
    table.tHead.addEventListener("click", (e) => {
      const th = e.target.closest("th");
      if (th && th.dataset.key) sortBy(th.dataset.key);
    });

    const count = document.getElementById("count"), search = document.getElementById("search");
    function applySearch() {
      const q = search.value.trim();
      let match = () => true;
      if (/^\d+$/.test(q)) {
        match = (r) => r.id === Number(q);
      } else if (q) {
        const ql = q.toLowerCase(), hits = new Set();
        index.vocab.forEach((t, j) => { if (t.trim().toLowerCase().includes(ql)) hits.add(j); });
        match = (r) => r.tokens.some((t) => hits.has(t));
      }
      let shown = 0;
      for (const r of rows) {
        r.tr.hidden = !match(r);
        if (!r.tr.hidden) shown++;
      }
      count.textContent = `${shown} of ${rows.length} latents`;
    }
    search.addEventListener("input", applySearch);
    applySearch();

    function show(id) {
      const r = byId.get(id);
      if (!r) {
        card.replaceChildren(el("p", { class: "note", text: `Latent ${id} is not in this browser.` }));
        return;
      }
      for (const x of tbody.querySelectorAll("tr.selected")) x.classList.remove("selected");
      r.tr.classList.add("selected");
      const name = index.files[L.file[r.i]];
      card.replaceChildren(el("p", { class: "note", text: `loading latent ${id}…` }));
      loadFile(name, (chunk) => {
        const rec = chunk.latents.find((x) => x.id === id);
        FB.renderCard(card, rec, index);
        card.scrollTop = 0;
      }, (msg) => card.replaceChildren(el("p", { class: "error", text: msg })));
    }
    tbody.addEventListener("click", (e) => {
      const tr = e.target.closest("tr");
      if (tr) location.hash = tr.dataset.id;
    });
    const fromHash = () => {
      const h = decodeURIComponent(location.hash.slice(1));
      if (/^\d+$/.test(h)) show(Number(h));
    };
    window.addEventListener("hashchange", fromHash);
    fromHash();
    FB.readyMs = performance.now();  // navigation start -> table populated
    document.body.dataset.ready = "1";
  }

  if (document.getElementById("latents") && DATA.index) initPage();
})();

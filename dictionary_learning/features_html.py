"""Feature browser files: index.html + app.js + style.css + the data, and a card for notebooks.

Data (schema_version 1; JSON, also written as `window.FB_DATA[name] = {...}` scripts because a
page opened from file:// cannot read JSON files):

data/index.json (.js)  {"schema_version", "meta", "vocab", "vocab_ids", "windows", "latents", "files"}
  meta       model, hook_name, layer, site, sae, dataset, split, seed, validation_fraction, ctx_len,
             exclude_first_k, n_tokens (scored held-out tokens), n_windows, dict_size, activation_dim,
             n_latents, bands, logit_lens {final_norm, gain, centred, formula}, config, versions...
  vocab      token strings; every token below is an index into it (vocab_ids: the model's token ids)
  windows    [n_windows][ctx_len] the held-out windows, as vocab indices
  latents    columns over the latents shown: id, fires (firing count), max (max activation),
             top_tokens (distinct vocab indices at the top activations, best first), file (index into
             files)
  files      names of the latent files, "latents_000", ...
data/latents_NNN.json (.js)  {"schema_version", "latents": [record, ...]}, record:
  id, fires, density_log10 (log10 of fires / n_tokens; log10(meta.density_floor) when dead), max,
  hist {lo, hi, counts}: counts of non-zero activations in equal bins over [lo, hi],
  top: contexts of the top activations (descending), a context being [window, start, center, values]:
       values[j] is the activation at position start + j of windows[window] (null: not scored),
       center the position of the chosen token,
  bands [{lo, hi, count, samples}]: tokens with lo·max <= activation < hi·max, count of them,
       samples: uniformly sampled contexts,
  logits {promoted, suppressed}: [[vocab index, logit weight], ...],
  similar: [[latent id, cosine of the W_dec rows], ...].
Values are rounded to 3 significant digits.
"""

from __future__ import annotations

import html
import json
import uuid
from pathlib import Path

SCHEMA_VERSION = 1
MARKER = ".feature_browser"
"""File in every folder this command writes (an --out without it is not replaced without --overwrite)."""
LATENTS_PER_FILE = 256
JSON_COPY_MAX_BYTES = 12_000_000
"""Plain .json copies of the data are written while the scripts total at most this (folder < 25 MB)."""
ASSETS = Path(__file__).resolve().parent

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Feature browser: {title}</title>
<link rel="stylesheet" href="style.css">
<script src="data/index.js"></script>
</head>
<body class="fb">
<header><h1>Feature browser: {title}</h1><p id="meta"></p></header>
<main>
<section id="list">
<div id="controls"><input id="search" type="search" placeholder="latent number or token text"
 aria-label="search latents"><span id="count"></span></div>
<div id="table-box"><table id="latents">
<thead><tr><th data-key="id" aria-sort="ascending">latent</th><th data-key="density">density (log10)</th>
<th data-key="max">max act.</th><th data-key="top">top token</th></tr></thead>
<tbody></tbody></table></div>
</section>
<section id="card"><p class="note">Click a latent to see its card.</p></section>
</main>
<script src="app.js"></script>
</body>
</html>
"""


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _script(name: str, text: str) -> str:
    return f"window.FB_DATA=window.FB_DATA||{{}};window.FB_DATA[{json.dumps(name)}]={text};\n"


def write_browser(data: dict, folder: Path) -> dict:
    """Write the browser into `folder` (normally a fresh temporary folder; see features.build).
    data: {"index": ..., "latents": [record, ...]} from features.collect. Returns the sizes."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    index, records = dict(data["index"]), data["latents"]
    chunks = [records[i : i + LATENTS_PER_FILE] for i in range(0, len(records), LATENTS_PER_FILE)]
    index["files"] = [f"latents_{i:03d}" for i in range(len(chunks))]
    index["latents"] = {**index["latents"], "file": [i // LATENTS_PER_FILE for i in range(len(records))]}
    texts = {"index": _dumps(index)}
    for name, chunk in zip(index["files"], chunks):
        texts[name] = _dumps({"schema_version": SCHEMA_VERSION, "latents": chunk})
    total = 0
    for name, text in texts.items():
        body = _script(name, text).encode()
        (folder / "data" / f"{name}.js").write_bytes(body)
        total += len(body)
    json_copies = total <= JSON_COPY_MAX_BYTES
    if json_copies:
        for name, text in texts.items():
            (folder / "data" / f"{name}.json").write_text(text + "\n", encoding="utf-8")
    meta = index["meta"]
    title = html.escape(
        f"{meta.get('model', '')} {meta.get('hook_name', '')}, {Path(str(meta.get('sae', ''))).name}"
    )
    (folder / "index.html").write_text(PAGE.format(title=title), encoding="utf-8")
    (folder / "app.js").write_text((ASSETS / "features_app.js").read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "style.css").write_text(
        (ASSETS / "features_app.css").read_text(encoding="utf-8"), encoding="utf-8"
    )
    marker = {"written_by": "python -m dictionary_learning.features", "schema_version": SCHEMA_VERSION}
    (folder / MARKER).write_text(json.dumps({**marker, "json_copies": json_copies}) + "\n")
    return {"script_bytes": total, "json_copies": json_copies}


def card_html(data: dict, latent: int) -> str:
    """One latent's card as a self-contained HTML snippet (CSS, the page's renderer and only the
    data it needs), e.g. for IPython.display.HTML. data: as from features.collect."""
    index = data["index"]
    rec = next((r for r in data["latents"] if r["id"] == latent), None)
    if rec is None:
        raise ValueError(f"latent {latent} is not in this data (latents {index['latents']['id'][:5]}...)")
    # keep only the windows and tokens this card shows, renumbered
    ctxs = rec["top"] + [c for b in rec["bands"] for c in b["samples"]]
    wins = sorted({c[0] for c in ctxs})
    wmap = {w: i for i, w in enumerate(wins)}
    used = sorted({t for w in wins for t in index["windows"][w]}
                  | {t for k in ("promoted", "suppressed") for t, _ in rec["logits"][k]})  # fmt: skip
    vmap = {t: i for i, t in enumerate(used)}
    mini = {
        "meta": index["meta"],
        "vocab": [index["vocab"][t] for t in used],
        "windows": [[vmap[t] for t in index["windows"][w]] for w in wins],
    }
    ren = lambda cs: [[wmap[w], s, c, v] for w, s, c, v in cs]
    card = {
        **rec,
        "top": ren(rec["top"]),
        "bands": [{**b, "samples": ren(b["samples"])} for b in rec["bands"]],
        "logits": {k: [[vmap[t], v] for t, v in rec["logits"][k]] for k in ("promoted", "suppressed")},
    }
    payload = _dumps({"index": mini, "card": card}).replace("<", "\\u003c")  # no "</script>" inside
    js = (ASSETS / "features_app.js").read_text(encoding="utf-8")
    css = (ASSETS / "features_app.css").read_text(encoding="utf-8")
    div = f"fb-card-{uuid.uuid4().hex[:12]}"
    return (
        f'<div class="fb"><style>{css}</style><div id="{div}"></div>\n<script>\n{js}\n'
        f"(function(){{var d={payload};"
        f'FB.renderCard(document.getElementById("{div}"),d.card,d.index);}})();\n</script></div>'
    )

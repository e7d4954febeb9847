"""Per-latent statistics for the feature browser, streamed over tokens in O(m·k) memory.

Activations arrive as batches f [B, m] (B tokens, m latents); only their non-zero entries are used,
as (latent, value, token position) triples, so no [N, m] tensor for all N tokens is ever formed.

- `RunningTopK`: the k largest scores per row (latent) seen so far, with the token position of each.
- `LatentStats` (one pass): firing counts, min/max, the top-k activating tokens, a histogram of the
  non-zero activations whose range doubles as larger values arrive, and per histogram bin a uniform
  sample of its tokens, from which `bands` samples the lower bands of each latent's max ([0, ¼),
  [¼, ½), [½, ¾) × max by default; the top band is what the top-k shows). A uniform sample of s
  items of a stream is the s items with the smallest i.i.d. random keys (bottom-k sampling), so the
  samples are one more `RunningTopK`, keyed at random.
- `logit_lens`: the output tokens a decoder direction promotes and suppresses, W_U · (g ⊙ W_dec[i])
  with g the final norm's gain (Bricken et al. 2023, "Towards Monosemanticity", logit weights).
- `similar_latents`: the latents with the most similar decoder directions (cosine of W_dec rows).
- `encode_latents` / `context_values`: a subset of the SAE's latents through its encoder
  (jumprelu.encode, the one forward), and their values on the tokens around chosen ones.
"""

from __future__ import annotations

import math

import torch

from .jumprelu import encode

NEG_INF = float("-inf")


class RunningTopK:
    """The k largest scores of each of `rows` rows over a stream of (row, score, position) triples.

    values [rows, k] (descending; -inf where fewer than k were seen) and positions [rows, k] (int64;
    -1 there). `update` costs O(P log P + touched rows·k) for the P triples that beat their row's k-th; memory
    is O(rows·k).
    """

    def __init__(self, rows: int, k: int, device: str | torch.device = "cpu"):
        self.k = k
        self.values = torch.full((rows, k), NEG_INF, device=device)
        self.positions = torch.full((rows, k), -1, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, row: torch.Tensor, score: torch.Tensor, position: torch.Tensor) -> None:
        """row [P] (int64), score [P] (float), position [P] (int64) of the new triples."""
        k = self.k
        beats = score > self.values[row, -1]  # only these can enter (ties with the k-th keep the old)
        row, score, position = row[beats], score[beats], position[beats]
        if row.numel() == 0:
            return
        # segmented top-k of the new triples: sort by score, then stably by row; rank within the row
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(row[order], stable=True)]
        r = row[order]
        rows, inv, counts = torch.unique_consecutive(r, return_inverse=True, return_counts=True)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(len(r), device=r.device) - starts[inv]
        sel = rank < k
        new_v = torch.full((len(rows), k), NEG_INF, device=self.values.device)
        new_p = torch.full((len(rows), k), -1, dtype=torch.long, device=self.values.device)
        new_v[inv[sel], rank[sel]] = score[order[sel]].to(new_v.dtype)
        new_p[inv[sel], rank[sel]] = position[order[sel]]
        top = torch.cat([self.values[rows], new_v], 1).topk(k, dim=1)  # merge the touched rows only
        self.values[rows] = top.values
        self.positions[rows] = torch.cat([self.positions[rows], new_p], 1).gather(1, top.indices)


def _nonzero(f: torch.Tensor, position: torch.Tensor):
    """f [B, m], position [B] -> (latent [P], value [P], position [P]) of the non-zero entries."""
    tok, lat = f.nonzero(as_tuple=True)
    return lat, f[tok, lat], position[tok]


DEFAULT_BANDS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75))
"""Lower activation bands, as fractions of each latent's max, sampled for the 'quantile' panel."""


def bin_range(vmax: torch.Tensor) -> torch.Tensor:
    """Histogram range [0, R) per latent: R = 2^(floor(log2 max) + 1), the power of two just above the
    max (0 where max is 0). vmax [m] -> R [m]."""
    r = torch.exp2(torch.floor(torch.log2(vmax.clamp_min(1e-30))) + 1)
    return torch.where(vmax > 0, r, torch.zeros_like(r))


class LatentStats:
    """One streamed pass over the tokens; per latent (m of them), in O(m·(k + n_bins·per_bin)) memory:

    fires [m] (firing counts), max, min [m] (of the non-zero activations), top (RunningTopK: the k
    largest activations and their token positions), hist [m, n_bins]: counts of the non-zero
    activations in equal bins over [0, R) with R = bin_range(max), and per bin a uniform sample of
    up to per_bin of its tokens (`samples`, bottom-k of i.i.d. random keys, seeded).

    The range R grows by doubling as larger values arrive: each doubling adds bin pairs (2i, 2i+1)
    into bin i (and merges their samples), which is exact because R and n_bins are powers of two:
    the bin of v is always floor(v / R · n_bins). `bands` then samples the lower activation bands.
    """

    def __init__(self, m: int, k: int = 20, n_bins: int = 64, per_bin: int = 3, device="cpu", seed: int = 0):
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2, got {n_bins}")
        self.n_tokens, self.n_bins, self.per_bin = 0, n_bins, per_bin
        self.fires = torch.zeros(m, dtype=torch.long, device=device)
        self.max = torch.zeros(m, device=device)
        self.min = torch.full((m,), float("inf"), device=device)
        self.top = RunningTopK(m, k, device)
        self.range = torch.zeros(m, device=device)
        self.hist = torch.zeros(m, n_bins, dtype=torch.long, device=device)
        self.samples = RunningTopK(m * n_bins, per_bin, device)  # row = latent·n_bins + bin
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def update(self, f: torch.Tensor, position: torch.Tensor) -> None:
        """f [B, m] activations of B tokens, position [B] (int64) their global token positions."""
        m, nb = len(self.fires), self.n_bins
        self.n_tokens += f.shape[0]
        lat, val, pos = _nonzero(f, position)
        val = val.float()
        self.fires += torch.bincount(lat, minlength=m)
        self.max.scatter_reduce_(0, lat, val, "amax")
        self.min.scatter_reduce_(0, lat, val, "amin")
        self.top.update(lat, val, pos)
        new_range = bin_range(self.max)
        grow = (self.range > 0) & (new_range > self.range)
        if grow.any():
            self._double(grow, torch.log2(new_range / self.range.clamp_min(1e-30)).round().long())
        self.range = new_range
        b = (val / self.range[lat] * nb).floor().long().clamp_(0, nb - 1)
        self.hist.view(-1).index_add_(0, lat * nb + b, torch.ones_like(b))
        keys = torch.rand(len(lat), generator=self.generator, device=lat.device)
        self.samples.update(lat * nb + b, -keys, pos)  # the largest -key = the smallest key

    def _double(self, grow: torch.Tensor, times: torch.Tensor) -> None:
        """Merge bin pairs `times` [m] times for the latents in grow [m] (the range doubled)."""
        m, nb, s = len(self.fires), self.n_bins, self.per_bin
        vals = self.samples.values.view(m, nb, s)
        poss = self.samples.positions.view(m, nb, s)
        for step in range(1, int(math.log2(nb)) + 1):  # after log2(n_bins) merges all is in bin 0
            rows = (grow & (times >= step)).nonzero().flatten()
            if len(rows) == 0:
                break
            h = self.hist[rows]
            self.hist[rows] = torch.cat(
                [h.view(-1, nb // 2, 2).sum(-1), torch.zeros_like(h[:, : nb // 2])], 1
            )
            v, p = vals[rows].reshape(-1, nb // 2, 2 * s), poss[rows].reshape(-1, nb // 2, 2 * s)
            top = v.topk(s, dim=-1)
            pad_v = torch.full_like(top.values, NEG_INF)
            vals[rows] = torch.cat([top.values, pad_v], 1)
            poss[rows] = torch.cat(
                [p.gather(-1, top.indices), torch.full_like(pad_v, -1, dtype=torch.long)], 1
            )

    def bands(self, bands=DEFAULT_BANDS, per_band: int | None = None):
        """Uniform samples of the tokens in each band (a, b) of the max: the tokens of the histogram bins
        whose lower edge e satisfies a·max <= e < b·max (bands snap to bin edges; a bin is R/n_bins wide,
        at most max/n_bins·2). Returns (counts [m, n_bands] tokens per band, positions [m, n_bands,
        per_band], -1 where a band has fewer tokens)."""
        m, nb, s = len(self.fires), self.n_bins, self.per_bin
        per_band = per_band or s
        edges = self.range[:, None] * torch.arange(nb, device=self.range.device) / nb  # [m, nb] lower edges
        vals = self.samples.values.view(m, nb, s)
        poss = self.samples.positions.view(m, nb, s)
        counts, picks = [], []
        for a, b in bands:
            member = (
                (edges >= a * self.max[:, None]) & (edges < b * self.max[:, None]) & (self.max[:, None] > 0)
            )
            counts.append((self.hist * member).sum(1))
            v = torch.where(member[:, :, None], vals, NEG_INF).view(m, nb * s)
            top = v.topk(min(per_band, nb * s), dim=1)
            p = poss.reshape(m, nb * s).gather(1, top.indices)
            picks.append(torch.where(torch.isinf(top.values), -1, p))
        return torch.stack(counts, 1), torch.stack(picks, 1)


# ---------------------------------------------------------------------------- decoder directions


def final_norm(hf_model):
    """(module path, module) of the final norm before the unembedding of a transformers causal LM."""
    for path in (("model", "norm"), ("transformer", "ln_f"), ("gpt_neox", "final_layer_norm")):
        obj = hf_model
        try:
            for name in path:
                obj = getattr(obj, name)
        except AttributeError:
            continue
        return ".".join(path), obj
    raise ValueError(
        f"cannot find the final norm of {type(hf_model).__name__} (known: model.norm, transformer.ln_f, "
        "gpt_neox.final_layer_norm)"
    )


def norm_gain(norm) -> tuple[torch.Tensor | None, str, bool]:
    """(gain g [d] or None, formula, centred) of a final norm module: the elementwise scale it applies
    after normalising. Gemma's RMSNorm multiplies by (1 + weight) (transformers' GemmaRMSNorm,
    Gemma2RMSNorm, Gemma3RMSNorm); Llama's RMSNorm and LayerNorm by weight. LayerNorm also centres
    its input (centred True); its bias adds the same vector to every latent and is left out."""
    w = getattr(norm, "weight", None)
    name = type(norm).__name__
    centred = isinstance(norm, torch.nn.LayerNorm) or name.endswith("LayerNorm")
    if w is None:
        return None, "none", centred
    if name.startswith("Gemma") and "RMSNorm" in name:
        return 1.0 + w.detach().float(), "1 + weight", centred
    return w.detach().float(), "weight", centred


@torch.no_grad()
def logit_lens(hf_model, W_dec: torch.Tensor, k: int = 10, chunk: int = 256):
    """Logit weights of decoder directions: W_U · (g ⊙ v) for each row v of W_dec [n, d], where g is
    the final norm's gain (`norm_gain`; v is centred first for a LayerNorm) and W_U [V, d] the
    unembedding. The norm's 1/rms factor is a positive scalar per direction and is left out, as is
    a final logit soft-cap (monotone): neither changes the ranking.

    Returns (top_ids [n, k], top_values [n, k], bottom_ids [n, k], bottom_values [n, k], info) with
    bottom sorted ascending (most suppressed first); info names the norm and the formula.
    """
    path, norm = final_norm(hf_model)
    gain, formula, centred = norm_gain(norm)
    W_U = hf_model.get_output_embeddings().weight.detach().float()  # [V, d]
    out = ([], [], [], [])
    for i in range(0, len(W_dec), chunk):
        v = W_dec[i : i + chunk].to(device=W_U.device, dtype=torch.float32)
        if centred:
            v = v - v.mean(-1, keepdim=True)
        if gain is not None:
            v = v * gain.to(v.device)
        logits = v @ W_U.T  # [c, V]
        kk = min(k, logits.shape[1])
        top, bot = logits.topk(kk, dim=1), logits.topk(kk, dim=1, largest=False)
        for lst, t in zip(out, (top.indices, top.values, bot.indices, bot.values)):
            lst.append(t.cpu())
    info = {"final_norm": f"{path} ({type(norm).__name__})", "gain": formula, "centred": centred}
    info["formula"] = "W_U @ (gain * W_dec[i])" + (" after centring W_dec[i]" if centred else "")
    return (*(torch.cat(t) for t in out), info)


@torch.no_grad()
def similar_latents(W_dec: torch.Tensor, rows: torch.Tensor, k: int = 5, chunk: int = 1024):
    """For each latent in rows [n] (int64), the k other latents whose W_dec [m, d] rows have the
    largest cosine similarity to its own: (ids [n, k], cosines [n, k]), chunked ([chunk, m] at a time)."""
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, len(unit) - 1)
    ids, cos = [], []
    for i in range(0, len(rows), chunk):
        r = rows[i : i + chunk].to(unit.device)
        c = unit[r] @ unit.T  # [c, m]
        c[torch.arange(len(r), device=c.device), r] = NEG_INF  # not itself
        top = c.topk(k, dim=1)
        ids.append(top.indices.cpu())
        cos.append(top.values.cpu())
    return torch.cat(ids), torch.cat(cos)


def round_sig(t: torch.Tensor, digits: int = 3) -> list:
    """Values of t (any shape) rounded to `digits` significant digits, as nested Python lists whose
    floats print short in JSON (12.3, not 12.300000000000001); zeros become int 0, NaN None."""
    x = t.detach().double().cpu()
    nan = torch.isnan(x)
    x = torch.where(nan, torch.zeros_like(x), x)
    mag = torch.floor(torch.log10(x.abs().clamp_min(1e-300)))
    p = (digits - 1 - mag).clamp(-300, 300)  # n·10^-p with n an integer of `digits` digits
    n = torch.round(x * torch.pow(10.0, p))
    # dividing by an exact power of ten gives the double nearest the decimal n·10^-p
    y = torch.where(p >= 0, n / torch.pow(10.0, p.clamp_min(0)), n * torch.pow(10.0, (-p).clamp_min(0)))
    arr = y.numpy()
    out = arr.astype(object)  # Python floats, converted in C
    out[arr == 0] = 0
    out[nan.numpy()] = None
    return out.tolist()


def encode_latents(x, W, b, th):
    """The SAE's encoder (jumprelu.encode) restricted to the selected latents: x [B, d], W [d, m'] (those
    columns of W_enc), b, th [m'] -> f [B, m']."""
    return encode(x, W.T, b, th).f


@torch.no_grad()
def context_values(x, row_of, W, b, th, lat, pos, T: int, radius: int, block_rows: int = 2048):
    """Activation of latent lat[c] on the tokens around pos[c], for C chosen (latent, token) pairs.

    x [N_real, d]; row_of [N·T] (the row of x for each flat position, -1 where not scored); W [d, m'],
    b, th [m']; lat, pos [C]. Returns (start [C], values [C, 2·radius+1]): values[c, j] is the
    activation at window position start[c] + j, NaN where unscored or past the window's end.
    Computed a block of windows (~block_rows tokens) at a time: one [rows, d] x [d, latents shown
    there] product per block, large enough to run at GEMM speed.
    """
    w, col = pos // T, pos % T
    start = (col - radius).clamp_min(0)
    out = torch.full((len(lat), 2 * radius + 1), float("nan"), device=x.device)
    offs = torch.arange(2 * radius + 1, device=x.device)
    G = max(1, block_rows // T)  # windows per block
    order = torch.argsort(w, stable=True)
    blocks, counts = torch.unique_consecutive(w[order] // G, return_counts=True)
    i = 0
    for blk, n in zip(blocks.tolist(), counts.tolist()):
        idx, i = order[i : i + n], i + n
        rows = row_of[blk * G * T : (blk + 1) * G * T]
        scored = rows >= 0
        lats, inv = lat[idx].unique(return_inverse=True)
        if 2 * len(lats) > W.shape[1]:  # most latents: no column gather
            lats, inv = None, lat[idx]
        cols = (slice(None), lats) if lats is not None else (slice(None), slice(None))
        z = torch.full((len(rows), W.shape[1] if lats is None else len(lats)), float("nan"), device=x.device)
        z[scored] = encode_latents(x[rows[scored]], W[cols], b[cols[1]], th[cols[1]])
        p = start[idx, None] + offs  # [n, 2R+1] positions in the window
        vals = z[(w[idx, None] - blk * G) * T + p.clamp_max(T - 1), inv[:, None]]
        out[idx] = torch.where(p < T, vals, float("nan"))
    return start, out

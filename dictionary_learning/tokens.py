"""Texts -> token ids for the language model: tokenization, packing and padding (text sources: texts.py).

Packing rule (pack=True, the default): every text is tokenized without special tokens
and given ONE separator, then all texts are concatenated and cut into full ctx_len windows:
  - tokenizers that add BOS themselves (Gemma, Llama-3):  [BOS] + text
  - tokenizers that add no BOS (SmolLM2, GPT-2, Pythia):  text + [EOS]
A text longer than a window continues in the next one; no compute is spent on padding
(only the very last window of the data is right-padded).
With prepend_bos (default: when the tokenizer adds BOS itself, as Gemma's does) every window
starts with BOS followed by the next ctx_len − 1 tokens of that stream, as SAELens and Gemma Scope
build contexts: Gemma is trained with BOS first and degrades badly without it. Without it, the
first position of a window is often an attention sink: see `exclude_first_k`.
BOS, EOS and PAD positions (by token id) are never yielded (keep_mask False).

Padding (pack=False): one row per text, truncated to ctx_len and padded on either side.

A text longer than MAX_PIECE_CHARS characters (one 50 MB line, say) is tokenized piece by piece, each
piece cut before a space that follows a non-space, so memory stays bounded. For byte-level BPE
tokenizers with a word-level pre-tokenizer (SmolLM2, GPT-2, Llama-3) the ids equal the whole text's;
tokenizers that prepend a space to every call (SentencePiece Llama-2) may differ by a token at a cut.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

MAX_PIECE_CHARS = 1 << 16
"""Texts longer than this many characters are tokenized in pieces of at most this size."""

# ---------------------------------------------------------------------------- tokenization


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text itself (Gemma: yes; SmolLM2, GPT-2: no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def special_ids(tokenizer) -> list[int]:
    """The BOS/EOS/PAD token ids (never yielded as activations)."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a PAD nor an EOS token")
    return pad


def _check_text(text, index) -> str:
    if not isinstance(text, str):
        raise ValueError(f"record {index}: `text` is {type(text).__name__}, expected str")
    return text


def resolve_prepend_bos(tokenizer, prepend_bos: bool | None) -> int | None:
    """The BOS id every packed window starts with, or None. prepend_bos None: when the tokenizer adds
    BOS itself (Gemma: yes; SmolLM2: no). True on a tokenizer without BOS is an error."""
    if prepend_bos is None:
        prepend_bos = adds_bos(tokenizer)
    if not prepend_bos:
        return None
    if tokenizer.bos_token_id is None:
        raise ValueError(f"prepend_bos: tokenizer {type(tokenizer).__name__} has no BOS token")
    return tokenizer.bos_token_id


def pack_row(take, ctx_len: int, bos: int | None) -> list[int]:
    """One packed window from take(n) -> up to n next tokens of the stream ([] at its end): BOS first
    when `bos` is given (a separator BOS right after it is skipped, so a window never starts BOS BOS),
    then stream tokens up to ctx_len. [] when the stream has ended."""
    row = [] if bos is None else [bos]
    while len(row) < ctx_len:
        part = take(ctx_len - len(row))
        if not part:
            break
        if len(row) == 1 and bos is not None and part[0] == bos:
            part = part[1:]
        row += part
    return row if len(row) > (bos is not None) else []


def text_pieces(text: str) -> Iterator[str]:
    """Consecutive slices of `text` of at most MAX_PIECE_CHARS characters, each cut before a space that
    follows a non-space in the second half of the slice (else at the limit); the text itself if short."""
    limit, start = MAX_PIECE_CHARS, 0
    while len(text) - start > limit:
        lo, cut = start + limit // 2, text.rfind(" ", start + limit // 2, start + limit)
        while cut > lo and text[cut - 1].isspace():  # the start of a run of spaces
            cut = text.rfind(" ", lo, cut)
        cut = cut if cut > lo else start + limit
        yield text[start:cut]
        start = cut
    yield text[start:]


class TextIds:
    """The token ids of one text, handed out in order by take(n). A long text's pieces (text_pieces)
    are tokenized one at a time as they are needed: only one piece's ids are held."""

    def __init__(
        self, first: list[int], rest: Iterator[list[int]] | None = None, tail: list[int] | None = None
    ):
        self._buf, self._pos, self._rest, self._tail = first, 0, rest or iter(()), tail or []

    def _fill(self) -> bool:
        """True when ids remain (the buffer refilled from the next pieces, then the tail)."""
        while self._pos >= len(self._buf):
            nxt = next(self._rest, None)
            if nxt is None:
                if not self._tail:
                    return False
                nxt, self._tail = self._tail, []
            self._buf, self._pos = nxt, 0
        return True

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n and self._fill():
            k = min(n - len(out), len(self._buf) - self._pos)
            out += self._buf[self._pos : self._pos + k]
            self._pos += k
        return out

    def skip(self, n: int) -> None:
        while n > 0 and self._fill():
            k = min(n, len(self._buf) - self._pos)
            self._pos, n = self._pos + k, n - k

    @property
    def finished(self) -> bool:
        return not self._fill()

    def all(self) -> list[int]:
        out = []
        while self._fill():
            out += self.take(len(self._buf) - self._pos)
        return out


def _piece_ids(tokenizer, pieces: Iterator[str], **kw) -> Iterator[list[int]]:
    return (tokenizer(p, **kw)["input_ids"] for p in pieces)


def separated(tokenizer, text: str, bos_first: bool | None = None) -> TextIds | None:
    """The ids of one text with its packing separator (module docstring), tokenized lazily in pieces;
    None if the text has no tokens."""
    pieces = _piece_ids(tokenizer, text_pieces(text), add_special_tokens=False) if text else iter(())
    first = next((ids for ids in pieces if ids), None)
    if first is None:
        return None
    bos_first = adds_bos(tokenizer) if bos_first is None else bos_first
    if bos_first:
        return TextIds([tokenizer.bos_token_id, *first], pieces)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} adds no BOS and has no EOS: cannot separate texts"
        )
    return TextIds(first, pieces, [tokenizer.eos_token_id])


def separated_ids(tokenizer, text: str, bos_first: bool | None = None) -> list[int]:
    """Token ids of one text with its packing separator (see the module docstring); [] if empty."""
    ids = separated(tokenizer, text, bos_first)
    return ids.all() if ids is not None else []


def keep_mask_for(input_ids: torch.Tensor, tokenizer, attention_mask=None, exclude_first_k: int = 0):
    """BoolTensor like input_ids [N, T]: False at BOS/EOS/PAD ids, masked-out positions and the
    first `exclude_first_k` real positions of each row (counted from the first real token, so
    it is right for either padding side)."""
    keep = ~torch.isin(input_ids, torch.tensor(special_ids(tokenizer), device=input_ids.device))
    if attention_mask is not None:
        real = attention_mask.bool()
        keep &= real
    else:
        real = torch.ones_like(keep)
    if exclude_first_k > 0:
        keep &= real.long().cumsum(-1) > exclude_first_k
    return keep


def pack_texts(texts, tokenizer, ctx_len: int, exclude_first_k: int = 0, drop_last: bool = False,
               prepend_bos: bool | None = None):  # fmt: skip
    """Pack texts into windows -> (input_ids LongTensor [N, ctx_len], keep_mask BoolTensor [N, ctx_len]).

    Texts are separated by BOS/EOS (module docstring) and concatenated; a text longer than a
    window continues in the next one; with prepend_bos each window starts with BOS. Empty texts are
    skipped. The last partial window is right-padded with PAD (masked out of keep_mask; under causal
    attention right padding does not change earlier positions) or dropped with drop_last=True.
    The same windows as a TokenStream over the same texts (one `pack_row`).
    """
    if ctx_len < 1:
        raise ValueError(f"ctx_len must be >= 1, got {ctx_len}")
    bos_first, bos = adds_bos(tokenizer), resolve_prepend_bos(tokenizer, prepend_bos)
    flat: list[int] = []
    for i, text in enumerate(texts):
        flat.extend(separated_ids(tokenizer, _check_text(text, i), bos_first))
    pos = 0

    def take(n):
        nonlocal pos
        pos += n
        return flat[pos - n : pos]

    rows = []
    while row := pack_row(take, ctx_len, bos):
        rows.append(row)
    if rows and len(rows[-1]) < ctx_len and drop_last:
        rows.pop()
    return _packed(rows, tokenizer, ctx_len, exclude_first_k)


def _packed(rows: list[list[int]], tokenizer, ctx_len: int, exclude_first_k: int):
    """Packed rows (the last may be short) -> (input_ids [N, ctx_len] right-padded with PAD, keep [N, ctx_len])."""
    ids = torch.full((len(rows), ctx_len), _pad_id(tokenizer), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    keep = keep_mask_for(ids, tokenizer, exclude_first_k=exclude_first_k)
    keep &= torch.arange(ctx_len) < torch.tensor([len(r) for r in rows], dtype=torch.long)[:, None]
    return ids, keep


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids [N, T] for a padded batch: each row counts from its first real token, so a
    left-padded text gets the same positions as unpadded (pad positions get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_texts(texts, tokenizer, ctx_len: int, padding_side: str = "left", exclude_first_k: int = 0):
    """One row per text -> (input_ids [N, T], attention_mask [N, T], keep_mask [N, T]), T = the
    longest text (<= ctx_len) in tokens.

    Each text is tokenized with the tokenizer's own special tokens (BOS for Gemma), truncated to
    ctx_len tokens and padded on `padding_side`. Left padding needs position_ids(attention_mask)
    in the forward pass. Empty texts are an error (a row of pure padding has no meaning).
    """
    if ctx_len < 1:
        raise ValueError(f"ctx_len must be >= 1, got {ctx_len}")
    texts = [_check_text(t, i) for i, t in enumerate(texts)]
    rows = tokenizer(texts)["input_ids"] if texts else []
    for i, ids in enumerate(rows):
        if not texts[i] or not ids:
            raise ValueError(f"record {i}: empty text")
    return _collate([r[:ctx_len] for r in rows], tokenizer, padding_side, exclude_first_k)


def _collate(rows: list[list[int]], tokenizer, padding_side: str, exclude_first_k: int = 0):
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max((len(r) for r in rows), default=0)
    pad = _pad_id(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask, keep_mask_for(ids, tokenizer, mask, exclude_first_k)


# ---------------------------------------------------------------------------- text stream


class TokenStream:
    """Turns texts into model-input batches (packed windows or padded texts), tracking a
    position that can be saved and restored exactly: (epoch, text index, token offset).

    cfg: the fields ctx_len, pack, padding_side, exclude_first_k, epochs, prepend_bos of a
    buffer.BufferConfig; source: a texts.TextSource (iter_from(start) -> (index, text) pairs)."""

    def __init__(self, source, tokenizer, cfg):
        self.source, self.tok, self.cfg = source, tokenizer, cfg
        self.bos_first = adds_bos(tokenizer)
        self.bos = resolve_prepend_bos(tokenizer, cfg.prepend_bos) if cfg.pack else None
        self.restore(
            dict(
                epoch=0,
                text=0,
                offset=0,
                texts_consumed=0,
                texts_skipped=0,
                texts_truncated=0,
                tokens_truncated=0,
                contexts=0,
            )
        )

    def state(self) -> dict:
        return dict(self.st)

    def restore(self, st: dict) -> None:
        self.st, self._it, self._cur = dict(st), None, None
        self.ended = self.cfg.epochs is not None and st["epoch"] >= self.cfg.epochs
        self._epoch_tokens = 1 if st["text"] or st["offset"] else 0  # resumed mid-epoch: data is not empty

    def _next_ids(self) -> TextIds | None:
        """Token ids of the next non-empty text (packed: with separator, tokenized lazily in pieces;
        padded: truncated), or None at the end of the last epoch. Skipped empty texts are counted."""
        while True:
            if self._it is None:
                self._it = self.source.iter_from(self.st["text"])
            item = next(self._it, None)
            if item is None:
                if self._epoch_tokens == 0:
                    raise ValueError("no usable text in the data (all records empty?)")
                self.st.update(epoch=self.st["epoch"] + 1, text=0, offset=0)
                self._it, self._epoch_tokens = None, 0
                if self.cfg.epochs is not None and self.st["epoch"] >= self.cfg.epochs:
                    self.ended = True
                    return None
                continue
            i, text = item
            if self.cfg.pack:
                ids = separated(self.tok, _check_text(text, i), self.bos_first)
            else:
                pieces = text_pieces(_check_text(text, i))
                head = self.tok(next(pieces))["input_ids"] if text else []
                n = len(head) + sum(len(p) for p in _piece_ids(self.tok, pieces, add_special_tokens=False))
                if n > self.cfg.ctx_len:
                    self.st["texts_truncated"] += 1
                    self.st["tokens_truncated"] += n - self.cfg.ctx_len
                ids = TextIds(head[: self.cfg.ctx_len]) if head else None
            if ids is None:
                self.st.update(
                    text=i + 1,
                    texts_skipped=self.st["texts_skipped"] + 1,
                    texts_consumed=self.st["texts_consumed"] + 1,
                )
                continue
            self._epoch_tokens += 1
            return ids

    def _take(self, n: int) -> list[int]:
        """Up to n tokens of the current text (advancing the position)."""
        if self._cur is None:
            self._cur = self._next_ids()
            if self._cur is None:
                return []
            self._cur.skip(self.st["offset"])  # restored inside this text: skip what was consumed
        off = self.st["offset"]
        out = self._cur.take(n)
        if self._cur.finished:
            self._cur = None
            self.st.update(text=self.st["text"] + 1, offset=0, texts_consumed=self.st["texts_consumed"] + 1)
        else:
            self.st["offset"] = off + len(out)
        return out

    def next_batch(self, n: int):
        """Up to n contexts -> (input_ids [b, T], attention_mask [b, T] | None, keep [b, T],
        positions [b, T] (counted from each row's first real token), first context number),
        or None when the data has ended."""
        cfg, rows = self.cfg, []
        while len(rows) < n and not self.ended:
            row = pack_row(self._take, cfg.ctx_len, self.bos) if cfg.pack else self._take(cfg.ctx_len)
            if row:
                rows.append(row)
        if not rows:
            return None
        first = self.st["contexts"]
        self.st["contexts"] += len(rows)
        if not cfg.pack:
            ids, mask, keep = _collate(rows, self.tok, cfg.padding_side, cfg.exclude_first_k)
            return ids, mask, keep, position_ids(mask), first
        ids, keep = _packed(rows, self.tok, cfg.ctx_len, cfg.exclude_first_k)
        return ids, None, keep, torch.arange(cfg.ctx_len).expand_as(ids), first

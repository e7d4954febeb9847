"""tokens.py: a long text is tokenized in bounded pieces (same ids, exact resume), data files with
invalid UTF-8 are named by file and line. (Packing and padding are tested in test_buffer.py.)"""

import json
import random
from types import SimpleNamespace

import pytest
import transformers

from dictionary_learning import tokens
from dictionary_learning.texts import TextSource
from dictionary_learning.tokens import TokenStream
from dictionary_learning.utils import prepare_embedded_model

PIECE = 1000  # characters; the default (tokens.MAX_PIECE_CHARS) is far larger, the mechanism is the same


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(prepare_embedded_model())


class Recording:
    """The tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def long_text(n_words: int, seed: int = 0) -> str:
    """Words with single and double spaces, newlines and punctuation: the cuts must not change the ids."""
    rng = random.Random(seed)
    words = "the patient's troponin was 2.4 ng/mL; chest pain, dyspnea (at rest) and 12 ECG leads".split()
    seps = [" "] * 12 + ["  ", "\n", " \n ", ". "]
    return "".join(rng.choice(words) + rng.choice(seps) for _ in range(n_words)).strip()


def stream(tok, texts, pack=True, ctx_len=64):
    cfg = SimpleNamespace(
        ctx_len=ctx_len, pack=pack, padding_side="right", exclude_first_k=0, epochs=1, prepend_bos=None
    )
    return TokenStream(TextSource(texts), tok, cfg)


def real_ids(batch) -> list[int]:
    ids, _, keep_or_pad, *_ = batch
    return [i for row, k in zip(ids.tolist(), keep_or_pad.tolist()) for i, kept in zip(row, k) if kept]


def rows_of(s, n_contexts=8):
    out = []
    while (b := s.next_batch(n_contexts)) is not None:
        out += b[0].tolist()
    return out


def test_long_text_is_tokenized_in_bounded_pieces_with_the_same_ids(tok, monkeypatch):
    """Issue 16, Also: one huge line was tokenized whole (a 50 MB line took 7.4 GB). Texts longer than
    MAX_PIECE_CHARS are tokenized piece by piece, cut before a space, which for this byte-level BPE
    gives exactly the whole text's ids."""
    monkeypatch.setattr(tokens, "MAX_PIECE_CHARS", PIECE, raising=False)
    text, short = long_text(4000), "A short text."
    assert len(text) > 20 * PIECE
    rec = Recording(tok)
    got = rows_of(stream(rec, [text, short]))
    assert rec.longest <= PIECE
    eos = tok.eos_token_id  # SmolLM2 adds no BOS: each text ends with EOS (tokens.py docstring)
    want = tok(text, add_special_tokens=False)["input_ids"] + [eos]
    want += tok(short, add_special_tokens=False)["input_ids"] + [eos]
    flat = [i for row in got for i in row][: len(want)]
    assert flat == want
    assert tokens.separated_ids(rec, text) == tok(text, add_special_tokens=False)["input_ids"] + [eos]


def test_resume_inside_a_long_text_is_exact(tok, monkeypatch):
    """A state saved in the middle of a long text (several pieces in) restores to the same windows."""
    monkeypatch.setattr(tokens, "MAX_PIECE_CHARS", PIECE, raising=False)
    texts = [long_text(3000, seed=1), "after it", long_text(500, seed=2)]
    a = stream(tok, texts)
    for _ in range(12):
        a.next_batch(8)
    state = a.state()
    assert state["text"] == 0 and state["offset"] > 3 * PIECE // 4  # several pieces into text 0
    rest = rows_of(a)
    b = stream(tok, texts)
    b.restore(state)
    assert rows_of(b) == rest and b.state() == a.state()


def test_padded_long_text_counts_its_truncated_tokens(tok, monkeypatch):
    monkeypatch.setattr(tokens, "MAX_PIECE_CHARS", PIECE, raising=False)
    text = long_text(2000, seed=3)
    s = stream(tok, [text], pack=False, ctx_len=32)
    (row,) = rows_of(s)
    whole = tok(text)["input_ids"]
    assert row == whole[:32]
    assert s.state()["texts_truncated"] == 1 and s.state()["tokens_truncated"] == len(whole) - 32


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_text_file_with_invalid_utf8_names_file_and_line(tmp_path, suffix):
    """Issue 16, defect 15: the harvest's file reader names the file and the line."""
    good = ["first", "second"] if suffix == ".txt" else [json.dumps({"text": t}) for t in ("a", "b")]
    path = tmp_path / f"data{suffix}"
    path.write_bytes(("\n".join(good) + "\n").encode() + b"bad \xc3\x28 byte\n")
    src = TextSource(path)
    with pytest.raises(ValueError, match=rf"data\{suffix}:3: not valid UTF-8") as err:
        list(src.iter_from(0))
    assert "\n" not in str(err.value)

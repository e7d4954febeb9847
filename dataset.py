"""Medical QA text for SAE training: six sources formatted into {"text", "source_dataset"} records.

Raw schemas, as the Hub datasets (and the shipped samples in data/sample/) hold them:
  medqa, mmlu_*   {"data": {"Question": str, "Options": {"A": str, ..., "D": str}, "Correct Option": "A"}}
  medmcqa         {"question": str, "opa".."opd": str, "cop": 0-3, "exp": str | None}
  pubmedqa        {"data": {"Context": [str], "Question": str, "Options": {...}, "Correct Answer": str,
                            "Long Answer": str}}

Each source has one small pure formatter; build_dataset concatenates them, drops identical texts,
shuffles with the seed and cuts a held-out validation split (used by evaluation).

    python dataset.py --source sample --out data/medqa_combined        # offline, shipped sample
    python dataset.py --source hub --out DIR --push-to-hub USER/NAME   # full data, needs the Hub
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from numbers import Integral
from pathlib import Path
from typing import NamedTuple

from dictionary_learning.utils import read_json, read_jsonl, read_text, write_dir_atomic, write_json

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent
SAMPLE_DIR = REPO / "data" / "sample"
DEFAULT_OUT = REPO / "data" / "medqa_combined"
SOURCE_NAMES = (
    "medqa",
    "medmcqa",
    "pubmedqa",
    "mmlu_college_medicine",
    "mmlu_clinical_knowledge",
    "mmlu_professional_medicine",
)
TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
HUB_PROBE_TIMEOUT_S = 3.0
TRUE = ("1", "ON", "YES", "TRUE")


class BadRecord(ValueError):
    """A raw record with a missing or malformed field; str() is one line naming source, index, field."""

    def __init__(self, field: str, problem: str, source: str | None = None, index: int | None = None):
        super().__init__(field, problem)
        self.field, self.problem, self.source, self.index = field, problem, source, index

    def __str__(self) -> str:
        where = f"{self.source}[{self.index}]: " if self.source is not None else ""
        hint = " (pass skip_bad=True / --skip-bad to skip such records)" if self.source is not None else ""
        return f"{where}field {self.field!r} {self.problem}{hint}"


class HubUnreachable(ConnectionError):
    """The Hugging Face Hub cannot be reached (offline mode or no network)."""


# ---------------------------------------------------------------------------- field access


def _field(record, path: str):
    """record["a"]["b"] for path "a.b"; missing/None or a non-dict on the way -> BadRecord."""
    cur, keys = record, path.split(".")
    for i, key in enumerate(keys):
        if not isinstance(cur, dict):
            where = ".".join(keys[:i]) or "record"
            raise BadRecord(where, f"is a {type(cur).__name__}, expected a mapping")
        if cur.get(key) is None:
            raise BadRecord(".".join(keys[: i + 1]), "is missing (or null)")
        cur = cur[key]
    return cur


def _check_str(value, field: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(field, f"is a {type(value).__name__} ({value!r:.40}), expected a string")
    if not value.strip():
        raise BadRecord(field, "is empty")
    return value.strip()


def _string(record, path: str) -> str:
    return _check_str(_field(record, path), path)


def _options(record, path: str) -> dict[str, str]:
    """{"A": text, ...} in letter order. None values are dropped: Arrow struct columns fill keys that
    only other rows have (e.g. "E") with None."""
    opts = _field(record, path)
    if not isinstance(opts, dict):
        raise BadRecord(path, f"is a {type(opts).__name__}, expected a mapping of letters to texts")
    out = {}
    for key in sorted(opts, key=str):
        if opts[key] is None:
            continue
        if not (isinstance(key, str) and len(key) == 1 and "A" <= key <= "Z"):
            raise BadRecord(path, f"has key {key!r}, expected option letters A, B, C, ...")
        out[key] = _check_str(opts[key], f"{path}.{key}")
    if len(out) < 2:
        raise BadRecord(path, f"has {len(out)} option(s), expected at least 2")
    return out


# ---------------------------------------------------------------------------- formatters

QUESTION_END = ("?", ".", ":", "!")
# A trailing reference section: "Ref: Harrison 19th ed", "(Ref - Robbins)", "Reference: ...". Whole words
# only, so "Refractive", "Reflex", "Referred" or "Refer to" never match.
_REF_TRAILER = re.compile(r"(?:^|(?<=[\s(\[]))(?:Refs?|REF|References?|REFERENCES?)\s*[:.\-\u2013\u2014]")
MAX_REF_TRAILER = 250  # longer tails are kept: they are more than a citation


def question_line(question: str) -> str:
    """Append "?" unless the question already ends in ? . : or !."""
    return question if question.endswith(QUESTION_END) else question + "?"


def clean_explanation(exp: str | None) -> str | None:
    """Strip a final reference section ("Ref: ..."); None/empty (or a bare reference) -> None."""
    if exp is None:
        return None
    exp = exp.strip()
    matches = list(_REF_TRAILER.finditer(exp))
    if matches and len(exp) - matches[-1].start() <= MAX_REF_TRAILER:
        exp = exp[: matches[-1].start()].rstrip(" \t\n([-\u2013\u2014,;")
    return exp or None


def _mcq_lines(question: str, options: dict[str, str], correct: str) -> list[str]:
    return [
        question_line(question),
        "The options are:",
        *(f"{letter}. {text}" for letter, text in options.items()),
        f"Correct option: {correct}",
    ]


def format_mcq(record: dict) -> str:
    """medqa / mmlu_*: {"data": {"Question", "Options", "Correct Option"}} -> text."""
    question = _string(record, "data.Question")
    options = _options(record, "data.Options")
    letter = _string(record, "data.Correct Option").upper()
    if letter not in options:
        raise BadRecord("data.Correct Option", f"is {letter!r}, not one of the options {list(options)}")
    return "\n".join(_mcq_lines(question, options, options[letter]))


def format_medmcqa(record: dict) -> str:
    """medmcqa: flat question, opa..opd, cop (0-3), exp (may be null) -> text."""
    question = _string(record, "question")
    options = {letter: _string(record, key) for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd"))}
    cop = _field(record, "cop")
    if isinstance(cop, bool) or not isinstance(cop, Integral) or not 0 <= cop <= 3:
        raise BadRecord("cop", f"is {cop!r}, expected an integer 0-3")
    lines = _mcq_lines(question, options, options["ABCD"[int(cop)]])
    exp = record.get("exp")
    if exp is not None and not isinstance(exp, str):
        raise BadRecord("exp", f"is a {type(exp).__name__}, expected a string or null")
    exp = clean_explanation(exp)
    if exp:
        lines.append(f"Explanation: {exp}")
    return "\n".join(lines)


def format_pubmedqa(record: dict) -> str:
    """pubmedqa: {"data": {"Context": [str], "Question", "Options", "Correct Answer", "Long Answer"}} -> text."""
    context = _field(record, "data.Context")
    if not isinstance(context, (list, tuple)) or not context:
        raise BadRecord(
            "data.Context", f"is a {type(context).__name__}, expected a non-empty list of strings"
        )
    paragraphs = [_check_str(p, f"data.Context[{i}]") for i, p in enumerate(context)]
    question = _string(record, "data.Question")
    options = _options(record, "data.Options")
    answer = _string(record, "data.Correct Answer")
    matching = [text for text in options.values() if text.lower() == answer.lower()]
    if not matching:
        raise BadRecord(
            "data.Correct Answer", f"is {answer!r}, not one of the options {list(options.values())}"
        )
    long_answer = _string(record, "data.Long Answer")
    lines = ["Context:", *paragraphs, *_mcq_lines(question, options, matching[0])]
    return "\n".join([*lines, f"Detailed answer: {long_answer}"])


class Source(NamedTuple):
    hub_id: str
    split: str
    formatter: Callable[[dict], str]


SOURCES: dict[str, Source] = {
    "medqa": Source("openlifescienceai/medqa", "train", format_mcq),
    "medmcqa": Source("openlifescienceai/medmcqa", "train", format_medmcqa),
    "pubmedqa": Source("openlifescienceai/pubmedqa", "train", format_pubmedqa),
    "mmlu_college_medicine": Source("openlifescienceai/mmlu_college_medicine", "test", format_mcq),
    "mmlu_clinical_knowledge": Source("openlifescienceai/mmlu_clinical_knowledge", "test", format_mcq),
    "mmlu_professional_medicine": Source("openlifescienceai/mmlu_professional_medicine", "test", format_mcq),
}
assert tuple(SOURCES) == SOURCE_NAMES


# ---------------------------------------------------------------------------- loading raw records


def check_hub_reachable(hint: str = "use --source sample", timeout: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Fail fast (no retry storm) when offline mode is set or the Hub does not answer within `timeout` s."""
    from huggingface_hub import constants

    flags = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").upper() in TRUE]
    if constants.HF_HUB_OFFLINE or flags:
        names = "/".join(flags) or "HF_HUB_OFFLINE"
        raise HubUnreachable(f"the Hugging Face Hub is unreachable: offline mode is set ({names}=1); {hint}")
    import urllib.error
    import urllib.request

    try:  # any HTTP answer, even an error status, means reachable
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        pass
    except Exception as e:  # no HTTP answer at all: unreachable
        raise HubUnreachable(
            f"the Hugging Face Hub ({constants.ENDPOINT}) is unreachable ({type(e).__name__}); {hint}"
        ) from None


def _load_hub(hub_id: str, split: str | None, hint: str):
    check_hub_reachable(hint)
    import datasets

    try:
        return datasets.load_dataset(hub_id, split=split)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not load {hub_id!r} (split {split}) from the Hub: {first}") from None


def load_source(name: str, source: str = "sample", sample_dir: str | os.PathLike | None = None):
    """Raw records of one source: a list of dicts ("sample") or a datasets.Dataset of dicts ("hub")."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose one of {SOURCE_NAMES}")
    if source == "sample":
        return read_jsonl(Path(sample_dir or SAMPLE_DIR) / f"{name}.jsonl")
    if source == "hub":
        return _load_hub(
            SOURCES[name].hub_id, SOURCES[name].split, "use --source sample (the shipped sample)"
        )
    raise ValueError(f"source must be 'sample' or 'hub', got {source!r}")


def format_records(name: str, records, skip_bad: bool = False) -> tuple[list[str], int, str | None]:
    """Format one source's raw records -> (texts, n_skipped, first skip message)."""
    formatter, texts, skipped, first_error = SOURCES[name].formatter, [], 0, None
    for index, record in enumerate(records):
        try:
            texts.append(formatter(record))
        except BadRecord as e:
            e.source, e.index = name, index
            if not skip_bad:
                raise
            skipped += 1
            first_error = first_error or f"{name}[{index}]: field {e.field!r} {e.problem}"
    return texts, skipped, first_error


# ---------------------------------------------------------------------------- dedup, split


def split_indices(n: int, seed: int, validation_fraction: float) -> tuple[list[int], list[int]]:
    """Shuffle range(n) with a generator seeded by `seed`, cut off the validation part -> (train, val)."""
    import torch

    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    n_val = int(n * validation_fraction + 0.5)
    if validation_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[n_val:], perm[:n_val]


def split_texts(texts: list[str], seed: int = 0, validation_fraction: float = 0.1) -> dict[str, list[str]]:
    """Deduplicate (first occurrence kept), then a seeded shuffle and cut: {"train", "validation"}."""
    texts = list(dict.fromkeys(texts))
    train, val = split_indices(len(texts), seed, validation_fraction)
    return {"train": [texts[i] for i in train], "validation": [texts[i] for i in val]}


def build_splits(
    source="sample",
    seed=0,
    validation_fraction=0.1,
    skip_bad=False,
    dedup=True,
    sample_dir=None,
    sources=SOURCE_NAMES,
) -> tuple[dict[str, list[dict]], dict]:
    """All sources -> ({"train": [records], "validation": [records]}, per-source summary counts).

    Records are deduplicated on `text` BEFORE the split, so no text is in both splits."""
    records, summary, seen = [], {}, set()
    for name in sources:
        raw = load_source(name, source, sample_dir)
        texts, skipped, first_error = format_records(name, raw, skip_bad)
        row = {"read": len(raw), "skipped": skipped, "duplicates": 0, "train": 0, "validation": 0}
        for text in texts:
            if dedup and text in seen:
                row["duplicates"] += 1
                continue
            seen.add(text)
            records.append({"text": text, "source_dataset": name})
        if first_error:
            row["first_skipped"] = first_error
        summary[name] = row
    # split the distinct texts; every copy of a text (kept with --no-dedup) goes to its text's split
    copies: dict[str, list[dict]] = {}
    for r in records:
        copies.setdefault(r["text"], []).append(r)
    distinct = list(copies)
    train, val = split_indices(len(distinct), seed, validation_fraction)
    splits = {
        name: [r for i in idx for r in copies[distinct[i]]]
        for name, idx in (("train", train), ("validation", val))
    }
    for split, recs in splits.items():
        for r in recs:
            summary[r["source_dataset"]][split] += 1
    return splits, summary


def to_dataset_dict(splits: dict[str, list[dict]]):
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "source_dataset": datasets.Value("string")}
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"text": [r["text"] for r in recs], "source_dataset": [r["source_dataset"] for r in recs]},
                features=features,
            )
            for split, recs in splits.items()
        }
    )


def build_dataset(
    source="sample", seed=0, validation_fraction=0.1, skip_bad=False, dedup=True, sample_dir=None
):
    """DatasetDict with "train" and "validation" splits, columns text and source_dataset."""
    return to_dataset_dict(logged_splits(source, seed, validation_fraction, skip_bad, dedup, sample_dir))


_LOGGED: set[str] = set()  # summaries already logged at INFO by this process


def logged_splits(source, *args) -> dict[str, list[dict]]:
    """build_splits(source, *args)'s splits, with its summary logged (INFO once per process, as a run
    loads the same texts for several stages; DEBUG after that)."""
    splits, summary = build_splits(source, *args)
    line = f"built {source} dataset: {json.dumps(summary)}"
    log.log(logging.DEBUG if line in _LOGGED else logging.INFO, line)
    _LOGGED.add(line)
    return splits


def format_summary(summary: dict) -> str:
    cols = ("read", "skipped", "duplicates", "train", "validation")
    lines = [f"{'source':<28}" + "".join(f"{c:>12}" for c in cols)]
    for name, row in summary.items():
        lines.append(f"{name:<28}" + "".join(f"{row[c]:>12}" for c in cols))
    lines.append(f"{'total':<28}" + "".join(f"{sum(r[c] for r in summary.values()):>12}" for c in cols))
    lines += [f"  skipped, first: {r['first_skipped']}" for r in summary.values() if r.get("first_skipped")]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- load_texts


def _texts_of(rows, where: str) -> list[str]:
    texts = []
    for i, row in enumerate(rows):
        text = row.get("text") if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise ValueError(f"{where}[{i}]: field 'text' is missing or not a string")
        texts.append(text)
    return texts


def _read_text_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if suffix == ".jsonl":
        return _texts_of(read_jsonl(path), str(path))
    if suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records with a 'text' field (or of strings)")
        return _texts_of(data, str(path))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if "text" not in names:
            raise ValueError(f"{path}: no 'text' column (columns: {names})")
        return _texts_of(pq.read_table(path, columns=["text"]).column("text").to_pylist(), str(path))
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {TEXT_SUFFIXES}")


def _dataset_texts(ds, where: str) -> list[str]:
    if "text" not in ds.column_names:
        raise ValueError(f"{where}: no 'text' column (columns: {ds.column_names})")
    return _texts_of(list(ds["text"]), where)


def _pick_split(native: dict[str, list[str]], split: str, seed: int, validation_fraction: float, where: str):
    """A source's own split when it has train AND validation (or a split other than those two is asked
    for); otherwise train/validation are cut from its single (or "train") split, deduplicated first."""
    if split in native and ("validation" in native or split not in ("train", "validation")):
        return native[split]
    base = "train" if "train" in native else (next(iter(native)) if len(native) == 1 else None)
    if split in ("train", "validation") and base is not None:
        return split_texts(native[base], seed, validation_fraction)[split]
    raise ValueError(f"{where}: no split {split!r} (available: {sorted(native)})")


def load_texts(spec: str, split: str = "train", seed: int = 0, validation_fraction: float = 0.1) -> list[str]:
    """Texts from "sample" / "hub" (built here), a folder written by `python dataset.py --out`, a
    .jsonl/.json/.txt/.parquet file with a `text` field, or a Hub dataset id with a `text` column."""
    spec = str(spec)
    if spec == "hub":  # the callers' flag is --dataset (dataset.py's own --source hub has its hint)
        check_hub_reachable("use --dataset sample (the shipped sample) or a local file")
    if spec in ("sample", "hub"):
        splits = logged_splits(spec, seed, validation_fraction)  # no Arrow round trip
        if split not in splits:
            raise ValueError(f"{spec}: no split {split!r} (available: {sorted(splits)})")
        return [r["text"] for r in splits[split]]
    path = Path(spec).expanduser()
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise ValueError(
                f"{path}: not a dataset folder written by `python dataset.py --out` ({e})"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            native = {name: _dataset_texts(d, f"{path}/{name}") for name, d in ds.items()}
        else:
            native = {"train": _dataset_texts(ds, str(path))}
    elif path.is_file():
        native = {"train": _read_text_file(path)}
    elif path.suffix.lower() in TEXT_SUFFIXES or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"{spec}: no such file or folder")
    else:
        hint = f"{spec!r} is not 'sample', 'hub' or an existing file/folder; use 'sample' or a local file"
        dd = _load_hub(spec, None, hint)
        native = {name: _dataset_texts(d, f"{spec}/{name}") for name, d in dd.items()}
    return _pick_split(native, split, seed, validation_fraction, spec)


# ---------------------------------------------------------------------------- saving, CLI


def _check_out(out: Path, overwrite: bool) -> None:
    """An existing --out folder is replaced only with --overwrite, only when dataset.py wrote it, and
    only when it holds nothing else (files of the user's are named, never deleted)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "dataset_dict.json").exists():
        raise FileExistsError(
            f"{out}: exists and is not a dataset folder written by dataset.py; choose another --out"
        )
    if not overwrite:
        raise FileExistsError(
            f"{out}: already holds a dataset; pass --overwrite to replace it, or another --out"
        )
    ours = {
        "dataset_dict.json",
        "summary.json",
        "parquet",
        *read_json(out / "dataset_dict.json").get("splits", []),
    }
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if others:
        raise FileExistsError(
            f"{out}: holds files dataset.py did not write ({', '.join(others[:5])}); move them out "
            "before --overwrite replaces the folder"
        )


def save_dataset(dd, out_dir: str | os.PathLike, meta: dict, overwrite: bool = False) -> Path:
    """save_to_disk + parquet/<split>.parquet + summary.json, written to a temp folder then renamed.
    An existing folder: see _check_out. Every split must hold records (an empty one cannot be loaded back)."""
    out = Path(out_dir)
    for split, d in dd.items():
        if len(d) == 0:
            raise ValueError(
                f"split {split!r} is empty: a folder with an empty split cannot be loaded back; "
                "add records or raise --validation-fraction"
            )
    _check_out(out, overwrite)

    def write(tmp: Path) -> None:
        dd.save_to_disk(str(tmp))
        (tmp / "parquet").mkdir()
        for split, ds in dd.items():
            ds.to_parquet(str(tmp / "parquet" / f"{split}.parquet"))
        write_json(tmp / "summary.json", meta)

    write_dir_atomic(out, write)  # a kill leaves the old folder (or OUT.old) complete
    return out


def push(dd, repo_id: str, private: bool = False) -> None:
    """Push to the Hub; the token comes from HF_TOKEN or the huggingface_hub login, never from code."""
    try:
        dd.push_to_hub(repo_id, token=os.environ.get("HF_TOKEN") or None, private=private)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConnectionError(f"push to {repo_id!r} failed: {first}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the combined medical QA text dataset.")
    p.add_argument(
        "--source",
        choices=("sample", "hub"),
        default="sample",
        help="shipped offline sample (default) or the full Hub datasets",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (save_to_disk + parquet/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder at --out")
    p.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="also push the DatasetDict (token: HF_TOKEN or login)"
    )
    p.add_argument("--private", action="store_true", help="make the pushed dataset private")
    p.add_argument("--seed", type=int, default=0, help="shuffle / split seed")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="held-out fraction for evaluation")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip (and count) malformed records instead of failing"
    )
    p.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep identical texts")
    p.add_argument("--sample-dir", default=None, help="folder of <source>.jsonl files (default data/sample)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not 0 < args.validation_fraction < 1:
            raise ValueError(
                f"--validation-fraction {args.validation_fraction:g}: must be > 0 and < 1 "
                "(the held-out split the evaluation reads)"
            )
        _check_out(Path(args.out), args.overwrite)  # before any work
        if args.push_to_hub:
            check_hub_reachable("drop --push-to-hub, or retry when online")
        splits, summary = build_splits(
            args.source, args.seed, args.validation_fraction, args.skip_bad, args.dedup, args.sample_dir
        )
        print(format_summary(summary))
        import datasets

        datasets.disable_progress_bars()
        dd = to_dataset_dict(splits)
        from dictionary_learning.utils import git_commit, package_versions

        meta = {
            "source": args.source,
            "seed": args.seed,
            "validation_fraction": args.validation_fraction,
            "skip_bad": args.skip_bad,
            "dedup": args.dedup,
            "sources": summary,
            "hub_ids": {n: f"{s.hub_id}:{s.split}" for n, s in SOURCES.items()},
            "git_commit": git_commit(),
            "versions": package_versions(),
        }
        out = save_dataset(dd, args.out, meta, overwrite=args.overwrite)
        print(f"saved {out} (train {len(dd['train'])}, validation {len(dd['validation'])})")
        if args.push_to_hub:
            push(dd, args.push_to_hub, private=args.private)
            print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    except (ValueError, OSError) as e:  # BadRecord, HubUnreachable, missing files, bad flags
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

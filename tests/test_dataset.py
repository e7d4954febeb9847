"""dataset.py: formatters (exact text), the original pipeline's bugs, bad records, dedup, split
determinism, the shipped sample, load_texts, and the CLI (offline failure, --out)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dataset as ds

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PQAL = SHARED / "data" / "pubmedqa" / "ori_pqal_800.json"

MCQ = {
    "id": "t-1",
    # Out of letter order on purpose, plus an Arrow-style None for a key only other rows have.
    "data": {
        "Question": "Which vitamin deficiency causes scurvy?",
        "Options": {"D": "Vitamin K", "B": "Vitamin C", "A": "Vitamin A", "C": "Vitamin D", "E": None},
        "Correct Option": "B",
    },
}
MEDMCQA = {
    "question": "Drug of choice for status epilepticus",
    "opa": "Lorazepam",
    "opb": "Valproate",
    "opc": "Phenobarbitone",
    "opd": "Levetiracetam",
    "cop": 0,
    "exp": "Intravenous lorazepam stops most seizures within minutes. Ref: Harrison 19th ed p. 2557",
}
PUBMEDQA = {
    "data": {
        "Context": ["Background sentence about the trial.", "  Results: the rate fell from 9% to 5%.  "],
        "Question": "Does the intervention reduce the rate",
        "Options": {"A": "yes", "B": "no", "C": "maybe"},
        "Correct Answer": "yes",
        "Long Answer": "The intervention reduced the rate.",
    }
}


def copy(record):
    return json.loads(json.dumps(record))


# ---------------------------------------------------------------------------- exact formatter output


def test_format_mcq_exact():
    assert ds.format_mcq(MCQ) == (
        "Which vitamin deficiency causes scurvy?\n"
        "The options are:\n"
        "A. Vitamin A\n"
        "B. Vitamin C\n"
        "C. Vitamin D\n"
        "D. Vitamin K\n"
        "Correct option: Vitamin C"
    )


def test_format_medmcqa_exact():
    assert ds.format_medmcqa(MEDMCQA) == (
        "Drug of choice for status epilepticus?\n"
        "The options are:\n"
        "A. Lorazepam\n"
        "B. Valproate\n"
        "C. Phenobarbitone\n"
        "D. Levetiracetam\n"
        "Correct option: Lorazepam\n"
        "Explanation: Intravenous lorazepam stops most seizures within minutes."
    )


def test_format_pubmedqa_exact():
    assert ds.format_pubmedqa(PUBMEDQA) == (
        "Context:\n"
        "Background sentence about the trial.\n"
        "Results: the rate fell from 9% to 5%.\n"
        "Does the intervention reduce the rate?\n"
        "The options are:\n"
        "A. yes\n"
        "B. no\n"
        "C. maybe\n"
        "Correct option: yes\n"
        "Detailed answer: The intervention reduced the rate."
    )


def test_formatters_do_not_mutate_records():
    for fmt, rec in ((ds.format_mcq, MCQ), (ds.format_medmcqa, MEDMCQA), (ds.format_pubmedqa, PUBMEDQA)):
        before = copy(rec)
        fmt(rec)
        assert rec == before


# ---------------------------------------------------------------------------- the original pipeline's bugs


@pytest.mark.parametrize("exp", [None, "", "   ", "Ref: Guyton and Hall, 13th ed"])
def test_no_explanation_line_without_explanation(exp):
    text = ds.format_medmcqa({**MEDMCQA, "exp": exp})
    assert "Explanation" not in text and "None" not in text
    assert text.endswith("Correct option: Lorazepam")


@pytest.mark.parametrize(
    "exp",
    [
        "Refractive power of the cornea is about 43 dioptres.",
        "Reflex arc of the knee jerk runs through L3 and L4.",
        "Referred pain from the diaphragm is felt at the shoulder tip.",
        "The spleen is large. Refer to the anatomy chapter for its relations.",
        "Myopia is corrected with concave lenses; the Refractive index of the lens is higher in cataract.",
    ],
)
def test_ref_prefixed_words_survive(exp):
    assert ds.format_medmcqa({**MEDMCQA, "exp": exp}).endswith(f"\nExplanation: {exp}")


@pytest.mark.parametrize(
    "exp, kept",
    [
        ("Reflex tearing is normal. Ref: Harrison 19th ed", "Reflex tearing is normal."),
        ("Refractive errors are common (Ref - Parsons, 22nd ed)", "Refractive errors are common"),
        ("Spleen is the largest. Reference: Gray's Anatomy, 41st ed.", "Spleen is the largest."),
        ("Urea cycle is hepatic. Ref. Harper 31st ed", "Urea cycle is hepatic."),
    ],
)
def test_trailing_reference_section_is_cut(exp, kept):
    assert ds.format_medmcqa({**MEDMCQA, "exp": exp}).endswith(f"\nExplanation: {kept}")


@pytest.mark.parametrize(
    "question, first_line",
    [
        ("Is it benign?", "Is it benign?"),
        ("Name the drug of choice.", "Name the drug of choice."),
        ("Which of the following is true:", "Which of the following is true:"),
        ("Remember this!", "Remember this!"),
        ("Drug of choice for absence seizures", "Drug of choice for absence seizures?"),
    ],
)
def test_question_mark_only_when_no_final_punctuation(question, first_line):
    for text in (
        ds.format_medmcqa({**MEDMCQA, "question": question}),
        ds.format_mcq({"data": {**MCQ["data"], "Question": question}}),
    ):
        assert text.split("\n")[0] == first_line


# ---------------------------------------------------------------------------- malformed records


def _drop(record, *path):
    record = copy(record)
    cur = record
    for key in path[:-1]:
        cur = cur[key]
    del cur[path[-1]]
    return record


def _set(record, value, *path):
    record = copy(record)
    cur = record
    for key in path[:-1]:
        cur = cur[key]
    cur[path[-1]] = value
    return record


BAD = [
    ("medqa", _drop(MCQ, "data", "Question"), "data.Question"),
    ("medqa", _set(MCQ, "E", "data", "Correct Option"), "data.Correct Option"),
    ("mmlu_college_medicine", _set(MCQ, 3, "data", "Options", "A"), "data.Options.A"),
    ("mmlu_clinical_knowledge", _set(MCQ, ["x"], "data", "Question"), "data.Question"),
    ("mmlu_professional_medicine", _set(MCQ, "not a dict", "data"), "data"),
    ("medmcqa", _set(MEDMCQA, 7, "cop"), "cop"),
    ("medmcqa", _set(MEDMCQA, "2", "cop"), "cop"),
    ("medmcqa", _set(MEDMCQA, True, "cop"), "cop"),
    ("medmcqa", _drop(MEDMCQA, "cop"), "cop"),
    ("medmcqa", _set(MEDMCQA, 42, "opb"), "opb"),
    ("medmcqa", _set(MEDMCQA, ["a list"], "exp"), "exp"),
    ("pubmedqa", _set(PUBMEDQA, "one string", "data", "Context"), "data.Context"),
    ("pubmedqa", _set(PUBMEDQA, ["ok", 5], "data", "Context"), "data.Context[1]"),
    ("pubmedqa", _set(PUBMEDQA, "perhaps", "data", "Correct Answer"), "data.Correct Answer"),
    ("pubmedqa", _drop(PUBMEDQA, "data", "Long Answer"), "data.Long Answer"),
    ("medqa", ["not", "a", "record"], "record"),
]
GOOD = {"medqa": MCQ, "medmcqa": MEDMCQA, "pubmedqa": PUBMEDQA}


@pytest.mark.parametrize("name, bad, field", BAD)
def test_bad_record_error_names_source_index_field(name, bad, field):
    good = GOOD.get(name, MCQ)
    with pytest.raises(ds.BadRecord) as info:
        ds.format_records(name, [good, good, bad, good])
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert msg.startswith(f"{name}[2]: field {field!r} ") and "\n" not in msg
    assert info.value.field == field and info.value.index == 2
    texts, skipped, first = ds.format_records(name, [good, bad, good], skip_bad=True)
    assert skipped == 1 and len(texts) == 2 and first.startswith(f"{name}[1]")


@pytest.fixture
def sample_dir(tmp_path):
    out = tmp_path / "sample"
    shutil.copytree(ds.SAMPLE_DIR, out)
    return out


def _append(path: Path, *records):
    with path.open("a") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_build_fails_on_bad_record_and_skip_bad_counts_it(sample_dir):
    path = sample_dir / "medmcqa.jsonl"
    n = len(path.read_text().splitlines())
    _append(path, _set(MEDMCQA, 9, "cop"))
    with pytest.raises(ds.BadRecord, match=rf"^medmcqa\[{n}\]: field 'cop' "):
        ds.build_dataset(sample_dir=sample_dir)
    splits, summary = ds.build_splits(sample_dir=sample_dir, skip_bad=True)
    row = summary["medmcqa"]
    assert (row["read"], row["skipped"]) == (n + 1, 1)
    assert row["train"] + row["validation"] == n  # nothing else lost
    assert "field 'cop'" in row["first_skipped"] and "field 'cop'" in ds.format_summary(summary)


def test_invalid_json_line_names_file_and_line(sample_dir):
    path = sample_dir / "medqa.jsonl"
    n = len(path.read_text().splitlines())
    _append(path, "{not json")
    with pytest.raises(ValueError, match=rf"medqa.jsonl:{n + 1}: not valid JSON"):
        ds.load_source("medqa", sample_dir=sample_dir)


def test_unknown_source_and_mode():
    with pytest.raises(ValueError, match="unknown source"):
        ds.load_source("pubmed")
    with pytest.raises(ValueError, match="'sample' or 'hub'"):
        ds.load_source("medqa", source="local")


# ---------------------------------------------------------------------------- dedup, split


def test_dedup_drops_identical_texts_before_split(sample_dir):
    first = (sample_dir / "medqa.jsonl").read_text().splitlines()[0]
    _append(sample_dir / "medqa.jsonl", first, first)
    splits, summary = ds.build_splits(sample_dir=sample_dir)
    texts = [r["text"] for s in splits.values() for r in s]
    assert summary["medqa"]["duplicates"] == 2 and len(texts) == len(set(texts))
    splits, summary = ds.build_splits(sample_dir=sample_dir, dedup=False)
    texts = [r["text"] for s in splits.values() for r in s]
    assert summary["medqa"]["duplicates"] == 0 and len(texts) == len(set(texts)) + 2
    # kept copies stay together: a repeated text is never in both splits, whatever the seed
    for seed in range(20):
        splits, _ = ds.build_splits(sample_dir=sample_dir, dedup=False, seed=seed, validation_fraction=0.5)
        assert not {r["text"] for r in splits["train"]} & {r["text"] for r in splits["validation"]}


def test_split_is_deterministic_and_seed_dependent():
    a, _ = ds.build_splits(seed=1)
    b, _ = ds.build_splits(seed=1)
    c, _ = ds.build_splits(seed=2)
    assert a == b
    assert [r["text"] for r in a["train"]] != [r["text"] for r in c["train"]]
    assert {r["text"] for r in a["validation"]} != {r["text"] for r in c["validation"]}


def test_splits_do_not_overlap_and_cover_everything():
    splits, summary = ds.build_splits(validation_fraction=0.2)
    train = {r["text"] for r in splits["train"]}
    val = {r["text"] for r in splits["validation"]}
    assert not train & val
    n = sum(row["read"] for row in summary.values())
    assert len(train) + len(val) == n and len(val) == round(0.2 * n)
    # plain texts: dedup before the cut, so a repeated text can't land in both splits
    texts = [f"t{i % 30}" for i in range(100)]
    parts = ds.split_texts(texts, seed=0, validation_fraction=0.3)
    assert not set(parts["train"]) & set(parts["validation"])
    assert sorted(parts["train"] + parts["validation"]) == sorted(set(texts))


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_validation_fraction(fraction):
    with pytest.raises(ValueError, match="validation_fraction"):
        ds.split_indices(10, 0, fraction)


def test_zero_validation_fraction_gives_empty_validation_split():
    dd = ds.build_dataset(validation_fraction=0.0)
    assert len(dd["validation"]) == 0 and len(dd["train"]) > 0


# ---------------------------------------------------------------------------- the shipped sample


def test_build_dataset_sample_has_all_sources():
    dd = ds.build_dataset("sample")
    assert sorted(dd) == ["train", "validation"]
    for split in dd.values():
        assert split.column_names == ["text", "source_dataset"]
    sources = list(dd["train"]["source_dataset"]) + list(dd["validation"]["source_dataset"])
    for name in ds.SOURCE_NAMES:
        assert sources.count(name) >= 40, name
    assert set(sources) == set(ds.SOURCE_NAMES)


def test_sample_files_exercise_the_bug_cases():
    for name in ds.SOURCE_NAMES:
        path = ds.SAMPLE_DIR / f"{name}.jsonl"
        assert path.stat().st_size < 150_000
    med = ds.load_source("medmcqa")
    exps = [r["exp"] for r in med]
    assert any(e is None for e in exps)
    assert any(e and ("Refractive" in e or "Reflex" in e) for e in exps)
    assert any(e and "Ref:" in e for e in exps)
    assert any(not r["question"].endswith(ds.QUESTION_END) for r in med)
    assert any(r["question"].endswith("?") for r in med)
    pub = ds.load_source("pubmedqa")
    assert {len(r["data"]["Context"]) for r in pub} >= {2, 3, 4}
    assert {r["data"]["Correct Answer"] for r in pub} == {"yes", "no", "maybe"}


def test_real_pubmedqa_through_formatter():
    if not PQAL.exists():
        pytest.skip(f"real PubMedQA-L file not present at {PQAL}")
    raw = json.loads(PQAL.read_text())
    records = [
        {
            "data": {
                "Context": v["CONTEXTS"],
                "Question": v["QUESTION"],
                "Options": {"A": "yes", "B": "no", "C": "maybe"},
                "Correct Answer": v["final_decision"],
                "Long Answer": v["LONG_ANSWER"],
            }
        }
        for v in raw.values()
    ]
    texts, skipped, _ = ds.format_records("pubmedqa", records)
    assert len(raw) == 800 and len(texts) == 800 and skipped == 0
    for v, text in zip(raw.values(), texts):
        assert text.startswith("Context:\n") and "None" not in text.split("\n")[-2]
        for paragraph in v["CONTEXTS"]:
            assert paragraph.strip() in text
        assert v["QUESTION"].strip() in text
        assert f"\nCorrect option: {v['final_decision']}\n" in text
        assert text.endswith(f"\nDetailed answer: {v['LONG_ANSWER'].strip()}")


# ---------------------------------------------------------------------------- CLI and load_texts


def _cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, str(REPO / "dataset.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def cli_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "combined"
    r = _cli("--out", str(out), "--seed", "3", "--validation-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    return out, r.stdout


@pytest.mark.slow
def test_cli_out_writes_loadable_folder(cli_out):
    import datasets

    out, stdout = cli_out
    expected = ds.build_dataset(seed=3, validation_fraction=0.2)
    loaded = datasets.load_from_disk(str(out))
    for split in ("train", "validation"):
        assert list(loaded[split]["text"]) == list(expected[split]["text"])
        assert loaded[split]["source_dataset"] == expected[split]["source_dataset"]
        parquet = datasets.Dataset.from_parquet(str(out / "parquet" / f"{split}.parquet"))
        assert list(parquet["text"]) == list(expected[split]["text"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["sources"]["medqa"]["read"] == 45
    assert "total" in stdout and "duplicates" in stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        # offline flags off, Hub endpoint refusing connections: the reachability probe must catch it
        {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    ],
)
def test_cli_hub_unreachable_fails_fast(tmp_path, env):
    r = _cli("--source", "hub", "--out", str(tmp_path / "x"), env=env, timeout=15)
    assert r.returncode == 2
    assert "--source sample" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = _cli("--out", str(tmp_path))
    assert r.returncode == 2 and "not a dataset folder" in r.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_load_texts_sample_matches_build_dataset():
    dd = ds.build_dataset(seed=5)
    assert ds.load_texts("sample", "train", seed=5) == list(dd["train"]["text"])
    assert ds.load_texts("sample", "validation", seed=5) == list(dd["validation"]["text"])


@pytest.mark.slow
def test_load_texts_saved_folder_uses_its_splits(cli_out):
    out, _ = cli_out
    expected = ds.build_dataset(seed=3, validation_fraction=0.2)
    # seed/fraction are ignored for a folder that already has train and validation splits
    assert ds.load_texts(str(out), "validation", seed=99) == list(expected["validation"]["text"])
    # a single parquet file has no splits of its own: with fraction 0 every text is in "train"
    got = ds.load_texts(str(out / "parquet" / "train.parquet"), "train", validation_fraction=0.0)
    assert sorted(got) == sorted(expected["train"]["text"])


def test_load_texts_files(tmp_path):
    texts = [f"text number {i}" for i in range(20)]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "other": 1}) + "\n" for t in texts))
    (tmp_path / "t.json").write_text(json.dumps([{"text": t} for t in texts]))
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n\n")
    for name in ("t.jsonl", "t.json", "t.txt"):
        train = ds.load_texts(str(tmp_path / name), "train", seed=0, validation_fraction=0.25)
        val = ds.load_texts(str(tmp_path / name), "validation", seed=0, validation_fraction=0.25)
        assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == sorted(texts)
    assert sorted(ds.load_texts(str(jsonl), validation_fraction=0.0)) == sorted(texts)


def test_load_texts_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ds.load_texts(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl\[1\]: field 'text'"):
        ds.load_texts(str(bad))
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "t.csv").write_text("text\nhello\n")
        ds.load_texts(str(tmp_path / "t.csv"))
    with pytest.raises(ValueError, match="no split 'test'"):
        ds.load_texts("sample", "test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ds.HubUnreachable, match="use 'sample' or a local file"):
        ds.load_texts("someone/some-dataset")


# ---------------------------------------------------------------------------- issue 16


def test_cli_refuses_an_existing_dataset_folder_unless_overwrite(tmp_path, capsys):
    """Issue 16, defect 5: --out on an existing dataset folder is refused without --overwrite, and
    --overwrite never deletes files dataset.py did not write (they are named instead)."""
    out = tmp_path / "ds"
    assert ds.main(["--out", str(out)]) == 0
    (out / "my_notes.txt").write_text("mine")
    summary = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert ds.main(["--out", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and str(out) in err and len(err.splitlines()) == 1
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "summary.json").read_bytes() == summary
    assert ds.main(["--out", str(out), "--seed", "1", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "my_notes.txt" in err and len(err.splitlines()) == 1
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "summary.json").read_bytes() == summary
    (out / "my_notes.txt").unlink()
    assert ds.main(["--out", str(out), "--seed", "1", "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 1
    assert ds.load_texts(str(out), "validation") == ds.load_texts("sample", "validation", seed=1)


def test_validation_fraction_zero_and_empty_splits_are_refused_by_name(tmp_path, capsys):
    """Issue 16, defect 6: --validation-fraction 0 used to write a folder that load_texts cannot read
    back (an empty split has no Arrow file). It is refused by name, and so is saving any empty split."""
    assert ds.main(["--out", str(tmp_path / "x"), "--validation-fraction", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--validation-fraction 0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    one = ds.to_dataset_dict({"train": [{"text": "only one", "source_dataset": "medqa"}], "validation": []})
    with pytest.raises(ValueError, match="split 'validation' is empty"):
        ds.save_dataset(one, tmp_path / "y", {})
    assert not (tmp_path / "y").exists()


BAD_UTF8 = {  # the invalid byte is on line 3 of each file
    ".txt": b"first text\nsecond text\nthird \xff text\n",
    ".jsonl": b'{"text": "a"}\n{"text": "b"}\n{"text": "c \xff"}\n',
    ".json": b'[\n"a",\n"b \xff"\n]\n',
}


@pytest.mark.parametrize("suffix", BAD_UTF8)
def test_invalid_utf8_names_the_file_and_line(tmp_path, suffix):
    """Issue 16, defect 15."""
    path = tmp_path / f"texts{suffix}"
    path.write_bytes(BAD_UTF8[suffix])
    with pytest.raises(ValueError, match=rf"texts\{suffix}:3: not valid UTF-8") as err:
        ds.load_texts(str(path))
    assert "\n" not in str(err.value)


def test_hub_dataset_offline_suggests_the_dataset_flag(monkeypatch):
    """Issue 16, defect 17: load_texts('hub') (demo.py / evaluation --dataset hub) offline points to
    --dataset sample, not to dataset.py's --source flag."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ds.HubUnreachable, match="--dataset sample") as err:
        ds.load_texts("hub")
    assert "--source" not in str(err.value)


def test_a_runs_repeated_loads_log_the_summary_once(caplog, monkeypatch):
    """demo.py loads the sample for several stages (train, validation, evaluation, browser): the
    summary is an INFO line once per process, not once per load; another build's summary is logged."""
    monkeypatch.setattr(ds, "_LOGGED", set())
    with caplog.at_level("DEBUG", logger=ds.log.name):
        for split in ("train", "validation", "train"):
            ds.load_texts("sample", split)
        ds.load_texts("sample", "train", seed=1)  # other splits: another summary
    info = [r for r in caplog.records if r.levelname == "INFO" and "built sample dataset" in r.message]
    debug = [r for r in caplog.records if r.levelname == "DEBUG" and "built sample dataset" in r.message]
    assert len(info) == 2 and len(debug) == 2

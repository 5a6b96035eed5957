"""Data roots in lookup order, the catalog, and `lightning-rlm data fetch` from local fixtures (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_rlm import paths as root_paths
from lightning_rlm.data import TextSource
from lightning_rlm.data.catalog import DATASETS, FetchError, dataset_of_file, fetch
from lightning_rlm.data.paths import BUNDLED_DIR, find_data_path, resolve_data_path
from lightning_rlm.main import main


@pytest.fixture
def no_roots(tmp_path, monkeypatch):
    """No $LRLM_DATA_DIR, no shared/data beside the repository or the working directory, an empty cache."""
    monkeypatch.delenv("LRLM_DATA_DIR", raising=False)
    monkeypatch.setenv("LRLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(root_paths, "REPO_ROOT", tmp_path / "clone" / "repo")
    (tmp_path / "work" / "cwd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "cwd")
    return tmp_path


def test_lookup_order(no_roots, monkeypatch):
    rel = "tinyshakespeare/input.txt"
    assert resolve_data_path(rel) == BUNDLED_DIR / rel  # bundled samples
    shared = no_roots / "clone" / "shared" / "data"
    (shared / "pile").mkdir(parents=True)
    (shared / "pile" / "pile_sample_pearl.jsonl").write_text('{"text": "shared"}\n')
    (shared / "tinyshakespeare").mkdir()
    (shared / rel).write_text("shared copy")
    assert resolve_data_path(rel) == BUNDLED_DIR / rel  # bundled before shared/data
    assert find_data_path("pile/pile_sample_pearl.jsonl")[0] == "shared/data beside the repository"
    env = no_roots / "env"
    (env / "tinyshakespeare").mkdir(parents=True)
    (env / rel).write_text("mine")
    monkeypatch.setenv("LRLM_DATA_DIR", str(env))
    assert resolve_data_path(rel) == env / rel  # $LRLM_DATA_DIR first
    cache = no_roots / "cache" / "data" / "gsm8k"
    cache.mkdir(parents=True)
    (cache / "test.jsonl").write_text("{}\n")
    assert find_data_path("gsm8k/test.jsonl") == ("fetched-data cache", cache / "test.jsonl")  # cache last
    explicit = no_roots / "work" / "cwd" / rel
    explicit.parent.mkdir()
    explicit.write_text("as given")
    assert resolve_data_path(rel) == Path(rel)  # a path as given wins


def test_missing_preset_file_is_one_line_naming_the_fetch_command(no_roots):
    with pytest.raises(FileNotFoundError) as e:
        TextSource(preset="pile").read()
    msg = str(e.value)
    assert "\n" not in msg and "lightning-rlm data fetch pile" in msg and "pile/pile_sample_pearl.jsonl" in msg
    order = ["as given", "$LRLM_DATA_DIR (unset)", "bundled samples", "shared/data beside", "fetched-data cache"]
    positions = [msg.index(label) for label in order]
    assert positions == sorted(positions)


def test_catalog_names_every_preset_file():
    from lightning_rlm.data.sources import PRESETS

    for name, preset in PRESETS.items():
        assert dataset_of_file(preset["path"]) == name
    assert all((BUNDLED_DIR / f).is_file() for d in DATASETS.values() if d.bundled for f in d.files)
    for folder in {Path(f).parts[0] for d in DATASETS.values() if d.bundled for f in d.files}:
        assert (BUNDLED_DIR / folder / "SOURCE.txt").is_file() and (BUNDLED_DIR / folder / "LICENSE.txt").is_file()


def _saved_gsm8k(tmp_path: Path) -> Path:
    import datasets

    rows = {"question": ["1+1?", "2+3?", "4*5?"], "answer": ["2\n#### 2", "5\n#### 5", "20\n#### 20"]}
    out = tmp_path / "gsm8k_saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({k: v[:2] for k, v in rows.items()}),
                          "train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(out))
    return out


def test_fetch_from_a_saved_dataset_writes_the_shipped_layout(tmp_path, capsys):
    source, root = _saved_gsm8k(tmp_path), tmp_path / "root"
    assert main(["data", "fetch", "gsm8k", "--from", str(source), "--out", str(root)]) is None
    test_rows = [json.loads(line) for line in (root / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert test_rows == [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "2+3?", "answer": "5\n#### 5"}]
    assert len((root / "gsm8k" / "train.jsonl").read_text().splitlines()) == 3
    assert "gsm8k_saved" in (root / "gsm8k" / "SOURCE.txt").read_text()
    assert not list(root.rglob("*.partial"))
    # a second fetch keeps what is there unless --force
    before = (root / "gsm8k" / "test.jsonl").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["data", "fetch", "gsm8k", "--from", str(source), "--out", str(root)])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert (root / "gsm8k" / "test.jsonl").read_bytes() == before
    assert main(["data", "fetch", "gsm8k", "--from", str(source), "--out", str(root), "--force"]) is None


def test_fetched_rows_respect_length_filters_and_ids(tmp_path):
    import datasets

    texts = ["short", "x" * 600, "y" * 5000, "z" * 700]
    src = tmp_path / "pile_saved"
    datasets.Dataset.from_dict({"text": texts, "meta": [{"pile_set_name": "P"}] * 4}).save_to_disk(str(src))
    (out,) = fetch("pile", tmp_path / "root", source=src, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and [len(r["text"]) for r in rows] == [600, 700]
    assert TextSource(path=str(out)).read() == ["x" * 600, "z" * 700]


def test_fetch_tokenizer_from_a_local_file(tmp_path, gpt2_tokenizer_file):
    (out,) = fetch("gpt2-tokenizer", tmp_path / "root", source=gpt2_tokenizer_file, progress=False)
    assert out == tmp_path / "root" / "gpt2-tokenizer" / "gpt2_tokenizer.json"
    assert out.read_bytes() == gpt2_tokenizer_file.read_bytes()


def test_offline_fetch_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        main(["data", "fetch", "commonsenseqa", "--out", str(tmp_path / "root")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "no network" in err and "LRLM_DATA_DIR" in err
    assert not (tmp_path / "root").exists()


def test_fetch_bad_names(tmp_path):
    with pytest.raises(FetchError, match="unknown dataset 'nope'"):
        fetch("nope", tmp_path)
    with pytest.raises(FetchError, match="bundled"):
        fetch("shakespeare", tmp_path)


def test_data_lists_every_dataset_and_where(no_roots, capsys):
    assert main(["data"]) is None
    out = capsys.readouterr().out
    for ds in DATASETS.values():
        assert ds.name in out
    assert f"bundled samples ({BUNDLED_DIR / 'tinyshakespeare' / 'input.txt'})" in out
    assert "missing: lightning-rlm data fetch gsm8k" in out

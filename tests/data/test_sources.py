import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_rlm.data import PRESETS, TextSource, split_documents


def test_blank_line_separator_merges_runs_of_blank_lines():
    assert split_documents("a\n\n\n\nb\n  \nc", "\n\n") == ["a", "b", "c"]


def test_literal_separator_and_no_separator():
    assert split_documents("one<|endoftext|>two<|endoftext|>", "<|endoftext|>") == ["one", "two"]
    assert split_documents("a\n\nb", None) == ["a\n\nb"]


def test_plain_text_with_endoftext(shared_data):
    docs = TextSource(path="tinystories/tinystories_sample_cs336.txt", separator="<|endoftext|>").read()
    assert len(docs) == 5 and all("<|endoftext|>" not in d for d in docs)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_read_real_files(preset, shared_data, need_data):
    need_data(PRESETS[preset]["path"])
    docs = TextSource(preset=preset).read()
    assert docs and all(isinstance(d, str) and d.strip() for d in docs)
    if preset == "shakespeare":
        assert len(docs) == 1 and docs[0].startswith("First Citizen")
    if preset == "pile":
        assert len(docs) == 1000


def test_a_preset_with_another_file_reads_that_file_in_its_own_format(tmp_path):
    rows = [{"text": "first {doc}"}, {"text": 'second "doc"'}]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = TextSource(preset="shakespeare", path=str(tmp_path / "mine.jsonl"))
    assert src.resolved_format() == "jsonl" and src.read() == ["first {doc}", 'second "doc"']
    (tmp_path / "mine.txt").write_text("a\n\nb\n")
    assert TextSource(preset="tinystories", path=str(tmp_path / "mine.txt")).read() == ["a\n\nb\n"]  # one document: no separator


def test_bad_jsonl_rows_name_file_and_line(tmp_path):
    for name, text, message in [("a", '{"text": "x"}\n{oops\n', "a.jsonl:2: invalid JSON"),
                                ("b", '[1, 2]\n', "b.jsonl:1: expected a JSON object per line"),
                                ("c", '{"text": 3}\n', "c.jsonl:1: field 'text' is 3; expected a string")]:
        (tmp_path / f"{name}.jsonl").write_text(text)
        with pytest.raises(ValueError, match=message):
            TextSource(path=str(tmp_path / f"{name}.jsonl")).read()
    (tmp_path / "d.txt").write_bytes(b"ok\nline two \xff\n")
    with pytest.raises(ValueError, match=r"d.txt:2: not UTF-8 text \(byte 0xff at offset 12\)"):
        TextSource(path=str(tmp_path / "d.txt")).read()


def test_explicit_field_overrides_preset(shared_data, pile_file):
    src = TextSource(preset="pile", max_documents=7)
    assert src.path == PRESETS["pile"]["path"] and len(src.read()) == 7


def test_jsonl_text_field_and_parquet(tmp_path):
    rows = [{"body": "first doc", "label": 1}, {"body": "second doc", "label": 0}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert TextSource(path=str(tmp_path / "x.jsonl"), text_field="body").read() == ["first doc", "second doc"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    src = TextSource(path=str(tmp_path / "x.parquet"), text_field="body")
    assert src.read() == ["first doc", "second doc"]
    assert src.read_rows()[0] == {"body": "first doc", "label": 1}
    with pytest.raises(KeyError, match="'text'"):
        TextSource(path=str(tmp_path / "x.jsonl")).read()


def test_missing_file_names_where_it_looked():
    with pytest.raises(FileNotFoundError, match="LRLM_DATA_DIR") as e:
        TextSource(path="nope/missing.txt").read()
    assert "nope/missing.txt" in str(e.value)


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty corpus"):
        TextSource(path=str(tmp_path / "empty.txt"), separator="\n\n").read()


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown text source preset 'shakespear'"):
        TextSource(preset="shakespear")


def test_hf_datasets_loader_on_a_local_file(tmp_path):
    # the same `load_dataset(name, config, split)` path users take with network, on a local json file
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n{"text": "second"}\n')
    src = TextSource(hf_name="json", hf_split="train", format="hf")
    src.hf_config = None
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(tmp_path / "d.jsonl"), split="train")
    assert list(ds["text"]) == ["hello world", "second"]
    assert src.resolved_format() == "hf"

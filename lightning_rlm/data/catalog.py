"""The data sets that configs, tests and benchmarks name, where each file is found and how to fetch it.

Tiny Shakespeare and the TinyStories sample travel with the package (`lightning_rlm/data/samples`), so a
bare clone or a wheel runs the main job and the default tests. The others are fetched once from their
public sources on the Hugging Face Hub by `lightning-rlm data fetch <name|all>` into the same file layout
(by default the fetched-data cache, `$LRLM_CACHE_DIR/data`, which is the last data root looked in; see
`lightning_rlm.paths`). A fetch from a local copy (`--from DIR`, a `datasets.save_to_disk` folder or a
folder holding the file) works offline, for mirrors and for tests.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Optional

from lightning_rlm.paths import find_data_path


class FetchError(RuntimeError):
    """A fetch that cannot run (offline, unknown name, a file already there): one line for the user."""


@dataclass(frozen=True)
class Output:
    """One file written from one split: rows keep `fields` (None: all); stop after `max_rows` or `max_chars`."""

    split: str
    file: str
    fields: Optional[tuple[str, ...]] = None
    add_id: bool = False
    max_rows: Optional[int] = None
    max_chars: Optional[int] = None
    min_chars: int = 0  # drop shorter `text` fields
    max_doc_chars: Optional[int] = None  # drop longer `text` fields


@dataclass(frozen=True)
class Dataset:
    name: str
    what: str
    licence: str
    hf_name: Optional[str] = None  # a hub dataset (rows) ...
    hf_config: Optional[str] = None
    outputs: tuple[Output, ...] = ()
    hf_file: Optional[str] = None  # ... or one file of a hub model repository,
    hf_file_target: Optional[str] = None  # written here
    bundled_files: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        if self.bundled_files:
            return self.bundled_files
        return tuple(o.file for o in self.outputs) if self.outputs else (str(self.hf_file_target),)

    @property
    def bundled(self) -> bool:
        return bool(self.bundled_files)

    def source(self) -> str:
        if self.bundled:
            return "bundled with the package"
        if self.hf_file:
            return f"hf://{self.hf_name}/{self.hf_file}"
        return f"hf://datasets/{self.hf_name}" + (f" ({self.hf_config})" if self.hf_config else "")


DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset("shakespeare", "Tiny Shakespeare (char-rnn)", "public domain text; char-rnn MIT",
            bundled_files=("tinyshakespeare/input.txt",)),
    Dataset("tinystories", "~1,000 TinyStories from the validation split", "CDLA-Sharing-1.0",
            bundled_files=("tinystories/tinystories_val_head.txt", "tinystories/tinystories_sample_cs336.txt")),
    Dataset("rationales", "24 TinyStories windows with SmolLM2 reasoning traces (`lightning-rlm rationalize`)",
            "CDLA-Sharing-1.0", bundled_files=("rationales/smollm2_tinystories_rationales.jsonl",)),
    Dataset("fineweb", "first FineWeb-Edu sample-10BT documents (~1 MB)", "ODC-By 1.0",
            hf_name="HuggingFaceFW/fineweb-edu", hf_config="sample-10BT",
            outputs=(Output("train", "fineweb-edu/fineweb_edu_sample10BT_head_heuristic_split.jsonl",
                            fields=("text",), add_id=True, max_chars=1_000_000),)),
    Dataset("pile", "1,000 Pile documents of 500-4,300 characters (~1.5 MB)",
            "the Pile's components carry their own licences (research use)",
            hf_name="monology/pile-uncopyrighted",
            outputs=(Output("train", "pile/pile_sample_pearl.jsonl", fields=("text", "meta"), add_id=True,
                            max_rows=1000, min_chars=500, max_doc_chars=4300),)),
    Dataset("gsm8k", "GSM8K grade-school math, test and train", "MIT", hf_name="openai/gsm8k", hf_config="main",
            outputs=(Output("test", "gsm8k/test.jsonl", fields=("question", "answer")),
                     Output("train", "gsm8k/train.jsonl", fields=("question", "answer")))),
    Dataset("commonsenseqa", "CommonsenseQA dev (five-way multiple choice)", "MIT", hf_name="tau/commonsense_qa",
            outputs=(Output("validation", "commonsenseqa/dev_rand_split.jsonl",
                            fields=("id", "question", "question_concept", "choices", "answerKey")),)),
    Dataset("gpt2-tokenizer", "GPT-2 byte-level BPE (HF tokenizers format)", "MIT (openai/gpt-2)",
            hf_name="openai-community/gpt2", hf_file="tokenizer.json",
            hf_file_target="gpt2-tokenizer/gpt2_tokenizer.json"),
]}


def dataset_of_file(path: str) -> Optional[str]:
    """The catalog name of a relative data file (None for a user's own file)."""
    norm = Path(path).as_posix()
    return next((d.name for d in DATASETS.values() if norm in d.files), None)


def where(dataset: Dataset) -> list[tuple[str, Optional[str]]]:
    """(file, where it is found or None) for each file of `dataset`."""
    out = []
    for f in dataset.files:
        found = find_data_path(f)
        out.append((f, None if found is None else f"{found[0]} ({found[1]})"))
    return out


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def fetch(name: str, out_root: Path, source: Optional[Path] = None, force: bool = False,
          progress: bool = True) -> list[Path]:
    """Write the files of dataset `name` under `out_root` in the shipped layout; return their paths.

    `source`: a local copy to read instead of the hub (a `save_to_disk` folder of a DatasetDict or Dataset, or,
    for the tokenizer, the file or a folder holding it). Files are written to a temporary name and renamed;
    an existing file is kept unless `force`.
    """
    if name not in DATASETS:
        raise FetchError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)} or 'all'")
    ds = DATASETS[name]
    if ds.bundled:
        raise FetchError(f"{name!r} is bundled with the package; nothing to fetch")
    targets = [out_root / f for f in ds.files]
    if not force and (there := [t for t in targets if t.exists()]):
        raise FetchError(f"{there[0]} already exists; pass --force to replace it")
    if source is None and hub_offline():
        raise FetchError(offline_message(ds, "HF_HUB_OFFLINE is set"))
    if source is None and (why := unreachable_hub()):
        raise FetchError(offline_message(ds, why))
    try:
        if ds.hf_file:
            return [_fetch_file(ds, out_root / ds.files[0], source)]
        return [_fetch_rows(ds, out, out_root / out.file, source, progress) for out in ds.outputs]
    except FetchError:
        raise
    except (OSError, ConnectionError, ValueError) as e:  # hub errors derive from these (requests, hf_hub)
        if source is not None:
            raise FetchError(f"cannot read {name!r} from {source}: {type(e).__name__}: {e}".splitlines()[0]) from e
        raise FetchError(offline_message(ds, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")) from e


def unreachable_hub(timeout: float = 5.0) -> Optional[str]:
    """Why the hub cannot be reached (None when a connection opens): fail in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot connect to {host}:{port}: {e.strerror or e}"
    return None


def offline_message(ds: Dataset, why: str) -> str:
    return (f"cannot fetch {ds.name!r} from {ds.source()}: no network ({why}). On a machine with network run "
            f"`lightning-rlm data fetch {ds.name}` and copy the files {list(ds.files)} to a folder here, then "
            f"set LRLM_DATA_DIR to that folder (or pass --from a local copy)")


def _rows(ds: Dataset, split: str, source: Optional[Path]) -> Iterable[dict]:
    import datasets

    if source is None:
        return datasets.load_dataset(ds.hf_name, ds.hf_config, split=split, streaming=True)
    local = datasets.load_from_disk(str(source))
    if isinstance(local, datasets.DatasetDict):
        if split not in local:
            raise FetchError(f"{source} has no split {split!r} (splits: {sorted(local)})")
        return local[split]
    return local


def _select(rows: Iterable[dict], out: Output) -> Iterator[dict]:
    n = chars = 0
    for row in rows:
        text = row.get("text")
        if isinstance(text, str) and (len(text) < out.min_chars or
                                      (out.max_doc_chars is not None and len(text) > out.max_doc_chars)):
            continue
        kept = {k: row[k] for k in out.fields if k in row} if out.fields else dict(row)
        if out.fields and (missing := [k for k in out.fields if k not in row and k != "meta"]):
            raise FetchError(f"rows of split {out.split!r} lack the fields {missing} (fields: {sorted(row)})")
        yield ({"id": n, **kept} if out.add_id else kept)
        n += 1
        chars += len(text) if isinstance(text, str) else 0
        if (out.max_rows is not None and n >= out.max_rows) or (out.max_chars is not None and chars >= out.max_chars):
            return


def _fetch_rows(ds: Dataset, out: Output, target: Path, source: Optional[Path], progress: bool) -> Path:
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    n = 0
    with tmp.open("w", encoding="utf-8") as f, tqdm(total=out.max_rows, desc=f"{ds.name} {out.split}",
                                                     unit="rows", disable=not progress) as bar:
        for row in _select(_rows(ds, out.split, source), out):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
            bar.update()
    if n == 0:
        tmp.unlink()
        raise FetchError(f"split {out.split!r} of {ds.name!r} gave no rows")
    tmp.replace(target)
    _write_source(ds, target.parent, f"{target.name}: split {out.split!r}, {n} rows", source)
    return target


def _fetch_file(ds: Dataset, target: Path, source: Optional[Path]) -> Path:
    if source is not None:
        src = source / ds.hf_file if source.is_dir() else source
        if not src.is_file():
            raise FetchError(f"{src} not found (expected the {ds.hf_file} file of {ds.hf_name})")
    else:
        from huggingface_hub import hf_hub_download

        src = Path(hf_hub_download(ds.hf_name, ds.hf_file))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    shutil.copyfile(src, tmp)
    tmp.replace(target)
    _write_source(ds, target.parent, f"{target.name}: {ds.hf_file}", source)
    return target


def _write_source(ds: Dataset, folder: Path, line: str, source: Optional[Path]) -> None:
    origin = str(source) if source is not None else ds.source()
    note = folder / "SOURCE.txt"
    head = "" if note.exists() else (f"{ds.what}\nFetched by `lightning-rlm data fetch {ds.name}` from {origin}\n"
                                     f"Licence: {ds.licence}\n")
    with note.open("a", encoding="utf-8") as f:
        f.write(head + f"{date.today().isoformat()} {line}\n")


def fetch_all(out_root: Path, force: bool = False, progress: bool = True,
              on_skip: Callable[[str], None] = print) -> list[Path]:
    """Fetch every dataset that is not bundled and not already found in a data root."""
    written = []
    for ds in DATASETS.values():
        if ds.bundled:
            continue
        if not force and all(found for _, found in where(ds)):
            on_skip(f"{ds.name}: already present")
            continue
        written += fetch(ds.name, out_root, force=force, progress=progress)
    return written

"""Documents for corpus-scale jobs (feature dashboards): read them, cut them into shards, tokenise them.

A corpus is a local file or folder:

- `.jsonl`: one JSON object per line, the document under `text_field` (default "text");
- `.txt` (or any other file): one document per non-empty line (use JSONL for documents with newlines);
- a folder written by `datasets.save_to_disk` (it holds `state.json` or `dataset_dict.json`; needs the
  `datasets` package, e.g. `pip install 'qktrace[scale]'`); a DatasetDict is read from its "train" split;
- any other folder: every `.jsonl` and `.txt` file under it, in sorted path order.

Documents are numbered 0, 1, ... in that order, and a shard is a run of consecutive documents. The driver
reads them and hands their text to a worker, so workers never need the corpus on their own disk.

`tokenize_chunks` cuts each document's tokens into chunks of at most `seq_len` tokens, BOS first in every
chunk when the SAEs want it (or the tokenizer adds it by itself). Every token is named by (document,
offset in the document), which orders it the same way whichever shard or worker saw it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError

TEXT_SUFFIXES = (".jsonl", ".txt")


def _is_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def corpus_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files (or the one `datasets` folder) a corpus path names, in reading order; InputError if none."""
    p = Path(path).expanduser()
    if not str(path).strip() or not p.exists():  # an empty path would read the current folder
        raise InputError(
            f"corpus {str(path)!r} does not exist: pass a .jsonl or .txt file, a folder of them, or a datasets folder"
        )
    if p.is_file() or _is_dataset(p):
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise InputError(f"corpus folder {p} holds no .jsonl or .txt files and is not a datasets.save_to_disk folder")
    return files


def fingerprint(path: str | os.PathLike[str]) -> list[list[Any]]:
    """[name, size, mtime_ns] of every file of the corpus: a restarted job resumes only on the same corpus."""
    out = []
    for f in corpus_files(path):
        parts = sorted(x for x in f.rglob("*") if x.is_file()) if f.is_dir() else [f]
        out += [[str(x), x.stat().st_size, x.stat().st_mtime_ns] for x in parts]
    return out


def _load_dataset(path: Path, text_field: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"{path} is a datasets.save_to_disk folder, which needs the datasets package: pip install 'qktrace[scale]'"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"{path} holds splits {sorted(ds)} but no 'train': save the split to read on its own")
        ds = ds["train"]
    if text_field not in ds.column_names:
        raise InputError(f"{path} has columns {ds.column_names} but no '{text_field}': pass the text column's name")
    return ds


MAX_LINE_BYTES = 4 << 20  # one corpus document or prompt record: a longer line is refused, not tokenised


def _lines(path: Path, max_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every non-blank line, each read with a bound: a line past `max_bytes` is
    refused with its number before it is read whole (a 50 MB line would abort the Rust tokenizer)."""
    max_bytes = MAX_LINE_BYTES if max_bytes is None else max_bytes
    with path.open("rb") as f:
        n = 0
        while line := f.readline(max_bytes + 1):
            n += 1
            if len(line) > max_bytes:
                raise InputError(
                    f"{path} line {n} is longer than {max_bytes >> 20} MiB: split that document into shorter lines"
                )
            if line.strip():
                yield n, line


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) of every non-blank line of a JSONL file (a corpus, batch prompts);
    InputError naming the file and line that is too long, not UTF-8, not JSON or nested too deeply."""
    for n, raw in _lines(path):
        try:
            record = json.loads(raw.decode("utf-8"))
            if b"\\ud" in raw.lower():  # an escaped surrogate: it must pair up
                json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeError:
            raise InputError(f"{path} line {n} is not valid UTF-8 text (or holds a lone surrogate): fix it") from None
        except (ValueError, RecursionError):
            raise InputError(f"{path} line {n} is not JSON: write one JSON object per line") from None
        yield n, record


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    for n, record in jsonl_records(path):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise InputError(f"{path} line {n} has no string '{text_field}': give each record its text there")
        yield text


def _text(path: Path) -> Iterator[str]:
    for _, raw in _lines(path):
        yield raw.decode("utf-8", errors="replace").rstrip("\n")


def iter_documents(path: str | os.PathLike[str], text_field: str = "text") -> Iterator[str]:
    """Every document of the corpus, in order (see the module docstring for the formats)."""
    for f in corpus_files(path):
        if f.is_dir():
            ds = _load_dataset(f, text_field)
            for i, batch in enumerate(ds.iter(batch_size=1000)):
                for j, t in enumerate(batch[text_field]):
                    if len(str(t)) > MAX_LINE_BYTES:
                        raise InputError(
                            f"{f} row {1000 * i + j} is longer than {MAX_LINE_BYTES >> 20} Mi characters: split it"
                        )
                    yield str(t)
        elif f.suffix == ".jsonl":
            yield from _jsonl(f, text_field)
        else:
            yield from _text(f)


def count_documents(path: str | os.PathLike[str], text_field: str = "text") -> int:
    """How many documents `iter_documents` yields (a dataset's length is read, not iterated). Every line
    of a text corpus is read as the job will read it, so a bad one is refused here, before any work."""
    n = 0
    for f in corpus_files(path):
        if f.is_dir():
            n += len(_load_dataset(f, text_field))
        else:
            n += sum(1 for _ in (_jsonl(f, text_field) if f.suffix == ".jsonl" else _lines(f)))
    return n


def shards(
    path: str | os.PathLike[str], docs_per_shard: int, text_field: str = "text", max_docs: int | None = None
) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """(shard index, [(document index, text), ...]) for runs of `docs_per_shard` consecutive documents."""
    batch: list[tuple[int, str]] = []
    index = 0
    for d, text in enumerate(iter_documents(path, text_field)):
        if max_docs is not None and d >= max_docs:
            break
        batch.append((d, text))
        if len(batch) == docs_per_shard:
            yield index, batch
            batch, index = [], index + 1
    if batch:
        yield index, batch


# ----------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True, eq=False)
class Chunks:
    """Token chunks of some documents. Chunk r holds `ids[r]`; its token at position p is token
    `offset[r] + p - has_bos` of document `doc[r]` (p = 0 is BOS when `has_bos`)."""

    ids: list[Tensor]  # each [pos] long
    doc: Tensor  # [chunk] long
    offset: Tensor  # [chunk] long: the document offset of the chunk's first non-BOS token
    has_bos: bool

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        """Tokens that count (BOS excluded)."""
        return sum(len(x) for x in self.ids) - (len(self.ids) if self.has_bos else 0)


def bos_token(tokenizer: Any, prepend_bos: bool | None) -> int | None:
    """The BOS id to put first in every chunk: when the SAEs ask for it (`prepend_bos`), or, when they do
    not say (None), when the tokenizer adds it by itself; None for no BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos is False or bos is None:
        if prepend_bos:
            raise InputError("the SAEs want a BOS token first but the tokenizer has none")
        return None
    if prepend_bos:
        return int(bos)
    probe = tokenizer("a")["input_ids"]
    return int(bos) if probe and probe[0] == bos else None


def tokenize_chunks(
    tokenizer: Any,
    docs: Sequence[tuple[int, str]],
    seq_len: int,
    bos: int | None,
    max_chunks_per_doc: int | None = None,
) -> Chunks:
    """Each document's tokens (no special tokens) in chunks of at most `seq_len` tokens, `bos` first in each."""
    if seq_len < 2:
        raise InputError(f"seq_len={seq_len} must be at least 2")
    body = seq_len - (bos is not None)
    ids: list[Tensor] = []
    doc: list[int] = []
    offset: list[int] = []
    encoded = tokenizer([t for _, t in docs], add_special_tokens=False)["input_ids"] if docs else []
    for (d, _), toks in zip(docs, encoded):
        for j, start in enumerate(range(0, len(toks), body)):
            if max_chunks_per_doc is not None and j >= max_chunks_per_doc:
                break
            piece = ([bos] if bos is not None else []) + list(toks[start : start + body])
            ids.append(torch.tensor(piece, dtype=torch.long, device="cpu"))
            doc.append(d)
            offset.append(start)
    return Chunks(
        ids=ids,
        doc=torch.tensor(doc, dtype=torch.long, device="cpu"),
        offset=torch.tensor(offset, dtype=torch.long, device="cpu"),
        has_bos=bos is not None,
    )

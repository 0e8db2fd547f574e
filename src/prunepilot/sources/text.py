"""Text for calibration and evaluation of language models, with calibration and evaluation never overlapping.

Sources: `pydocs` (prose from Debian's python3.11-doc HTML; the offline default), `text:PATH` (a UTF-8 file),
`wikitext2` / `hf:DATASET[:CONFIG]` (Hugging Face datasets, when installed and reachable).
The pydocs split is by document (a stable hash of each page's path), so no paragraph appears in both.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import torch

from ..errors import SourceError, require

PYDOCS_ROOT = Path("/usr/share/doc/python3.11/html")
_SKIP_PAGES = ("genindex", "search.html", "py-modindex", "contents.html", "copyright.html", "license.html")
_EVAL_SHARE = 4  # one document in four goes to evaluation


class _ProseParser(HTMLParser):
    """Collect the text of <p> elements, skipping code blocks and navigation."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._depth_p = 0
        self._depth_skip = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("pre", "script", "style"):
            self._depth_skip += 1
        elif tag == "p":
            self._depth_p += 1
            self._buf = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("pre", "script", "style") and self._depth_skip:
            self._depth_skip -= 1
        elif tag == "p" and self._depth_p:
            self._depth_p -= 1
            text = " ".join("".join(self._buf).split())
            if len(text) > 40:  # drop captions, labels and one-word paragraphs
                self.paragraphs.append(text)
            self._buf = []

    def handle_data(self, data: str) -> None:
        if self._depth_p and not self._depth_skip:
            self._buf.append(data)


def _doc_hash(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()


def python_docs_documents(root: Path = PYDOCS_ROOT) -> list[tuple[str, str]]:
    """(relative path, prose) for every page of the Python docs, ordered by a stable hash of the path."""
    if not root.is_dir():
        raise SourceError(
            "the default text source is the Python documentation from Debian's python3.11-doc",
            f"{root} not found",
            "apt-get install python3.11-doc, or pass --calib text:FILE --eval text:FILE",
        )
    from ..sources.gguf import cache_root  # same cache folder as models

    cache = cache_root() / "text" / f"pydocs-{_doc_hash(str(root))[:8]}.json"
    if cache.is_file():
        return [tuple(d) for d in json.loads(cache.read_text())]  # type: ignore[misc]
    docs: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.html")):
        rel = str(path.relative_to(root))
        if rel.startswith(("_", "whatsnew")) or any(s in rel for s in _SKIP_PAGES):
            continue  # changelogs are lists of issue numbers, not prose
        parser = _ProseParser()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        if parser.paragraphs:
            docs.append((rel, "\n\n".join(parser.paragraphs)))
    docs.sort(key=lambda d: _doc_hash(d[0]))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(docs))
    os.replace(tmp, cache)
    return docs


@dataclass
class TextSplit:
    """Calibration and evaluation text plus where each came from (goes into result.json)."""

    calib: str
    eval: str
    protocol: dict[str, Any] = field(default_factory=dict)


def _read_file(spec: str) -> str:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SourceError("a text source file must exist", spec, "pass text:PATH to a UTF-8 text file")
    return path.read_text(encoding="utf-8", errors="replace")


def _hf_text(name: str, split: str) -> str:
    datasets = require("datasets", "data", "reading a Hugging Face text dataset")
    dataset, _, config = name.partition(":")
    if dataset in ("wikitext2", "wikitext-2"):
        dataset, config = "wikitext", "wikitext-2-raw-v1"
    try:
        ds = datasets.load_dataset(dataset, config or None, split=split)
    except Exception as exc:  # network or missing dataset: say so plainly
        raise SourceError(
            f"the Hugging Face dataset '{name}' could not be loaded", type(exc).__name__,
            "use the offline default pydocs, or --calib text:FILE --eval text:FILE",
        ) from exc
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(t for t in ds[column] if t and t.strip())


def load_split(calib: str | None = "pydocs", eval: str | None = None) -> TextSplit:
    """Resolve calibration and evaluation text. Same source on both sides -> split it disjointly."""
    calib = calib or "pydocs"
    eval = eval or calib
    protocol: dict[str, Any] = {"calib_source": calib, "eval_source": eval}
    if calib == "pydocs" or eval == "pydocs":
        docs = python_docs_documents()
        ev = [d for d in docs if int(_doc_hash(d[0])[:8], 16) % _EVAL_SHARE == 0]
        ca = [d for d in docs if int(_doc_hash(d[0])[:8], 16) % _EVAL_SHARE != 0]
        py_calib, py_eval = "\n\n".join(t for _, t in ca), "\n\n".join(t for _, t in ev)
        protocol["pydocs"] = {"root": str(PYDOCS_ROOT), "calib_docs": len(ca), "eval_docs": len(ev),
                              "split": f"sha1(path) % {_EVAL_SHARE} == 0 -> eval"}
    calib_text = eval_text = ""
    if calib == eval and not calib.startswith("hf:") and calib not in ("wikitext2", "wikitext-2"):
        if calib == "pydocs":
            calib_text, eval_text = py_calib, py_eval
        else:  # one file: first 80% of paragraphs calibrate, the rest evaluates
            paras = _read_file(calib.removeprefix("text:")).split("\n\n")
            cut = max(1, int(len(paras) * 0.8))
            calib_text, eval_text = "\n\n".join(paras[:cut]), "\n\n".join(paras[cut:])
            protocol["file_split"] = "first 80% of paragraphs calibrate, last 20% evaluate"
        return TextSplit(calib_text, eval_text, protocol)
    calib_text = _resolve_one(calib, "train", py_calib if calib == "pydocs" else "")
    eval_text = _resolve_one(eval, "test", py_eval if eval == "pydocs" else "")
    return TextSplit(calib_text, eval_text, protocol)


def _resolve_one(spec: str, hf_split: str, pydocs_text: str) -> str:
    if spec == "pydocs":
        return pydocs_text
    if spec.startswith("text:"):
        return _read_file(spec[5:])
    if spec.startswith("hf:"):
        return _hf_text(spec[3:], hf_split)
    if spec in ("wikitext2", "wikitext-2"):
        return _hf_text(spec, hf_split)
    if Path(spec).expanduser().is_file():
        return _read_file(spec)
    raise SourceError("a text source is pydocs, text:PATH, wikitext2 or hf:DATASET[:CONFIG]", spec,
                      "e.g. --calib pydocs or --eval text:heldout.txt")


def encode(tok: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of `text` as one stream ([n] int64), reading only as much text as needed."""
    if max_tokens is not None:
        text = text[: max_tokens * 8]  # ~4 chars/token in English prose; 2x margin
    ids = tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    out = torch.tensor(ids, dtype=torch.long)
    return out if max_tokens is None else out[:max_tokens]


def token_blocks(
    tok: Any, text: str, seqlen: int, n_seqs: int, *, seed: int | None = None,
    role: tuple[str, str, str] = ("the text", "the count", "--seqlen"),
) -> torch.Tensor:
    """[n_seqs, seqlen] token blocks. seed=None: the first contiguous blocks (evaluation);
    seed=int: non-overlapping blocks drawn at random from the stream (calibration).
    Prepends BOS to every block when the tokenizer carries `prunepilot_add_bos` (Gemma-3 base).
    `role` names the text and the options that size it (what, count flag, length flag) for the error."""
    add_bos = bool(getattr(tok, "prunepilot_add_bos", False)) and tok.bos_token_id is not None
    body = seqlen - 1 if add_bos else seqlen
    pool = n_seqs if seed is None else n_seqs * 4  # a larger pool to sample calibration blocks from
    stream = encode(tok, text, max_tokens=body * pool)
    available = stream.numel() // body
    if available < n_seqs:
        what, count_flag, len_flag = role
        fits = stream.numel() // n_seqs + (1 if add_bos else 0)
        shorter = f"{len_flag} {fits}" if fits >= 16 else f"a shorter {len_flag}"
        raise SourceError(
            f"{what} holds {stream.numel()} tokens: {available} blocks of {seqlen}, but {count_flag} asks for {n_seqs}",
            f"{count_flag} {n_seqs}, {len_flag} {seqlen}",
            f"pass {count_flag} {available}" + (f" or {shorter}" if available else "") + ", or more text",
        )
    index = list(range(available))
    if seed is not None:
        index = sorted(random.Random(seed).sample(index, n_seqs))
    blocks = torch.stack([stream[i * body : (i + 1) * body] for i in index[:n_seqs]])  # [n, body]
    if add_bos:
        bos = torch.full((n_seqs, 1), tok.bos_token_id, dtype=torch.long)
        blocks = torch.cat([bos, blocks], dim=1)
    return blocks

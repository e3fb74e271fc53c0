"""`retrieval`: BM25 over the paragraphs of a local folder of text files, confined to that folder."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .registry import ToolCallError, tool
from .text_search import bm25_scores, words

RETRIEVAL_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
RETRIEVAL_MAX_FILES = 2000
RETRIEVAL_MAX_FILE_BYTES = 1_000_000
RETRIEVAL_PASSAGE_CHARS = 600  # longer paragraphs are split at sentence ends


@dataclass(frozen=True)
class Passage:
    file: str  # path relative to the root, with '/'
    text: str


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink resolved, lies inside the resolved `root`."""
    try:
        path.resolve(strict=True).relative_to(root.resolve(strict=True))
    except (ValueError, OSError):
        return False
    return True


def document_files(root: Path) -> list[Path]:
    """The text files under `root` that retrieval reads: symlinked folders are not entered,
    and a symlinked file counts only when it resolves to a file inside `root`."""
    root = root.resolve(strict=True)
    found: list[Path] = []
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(folder) / name
            if name.startswith(".") or path.suffix.lower() not in RETRIEVAL_SUFFIXES:
                continue
            if inside(path, root) and path.resolve().is_file():
                found.append(path)
            if len(found) >= RETRIEVAL_MAX_FILES:
                return found
    return found


def passages(root: Path, files: Sequence[Path]) -> list[Passage]:
    """The paragraphs of `files` (split at blank lines, long ones at sentence ends)."""
    out: list[Passage] = []
    for path in files:
        if path.stat().st_size > RETRIEVAL_MAX_FILE_BYTES:
            continue
        relative = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = " ".join(paragraph.split())
            while paragraph:
                piece = paragraph
                if len(piece) > RETRIEVAL_PASSAGE_CHARS:
                    cut = piece.rfind(". ", 0, RETRIEVAL_PASSAGE_CHARS)
                    piece = piece[: cut + 1] if cut > 0 else piece[:RETRIEVAL_PASSAGE_CHARS]
                out.append(Passage(relative, piece.strip()))
                paragraph = paragraph[len(piece) :].strip()
    return out


_INDEX_CACHE: dict[tuple, tuple[list[Passage], list[list[str]]]] = {}


def _index(root: Path, files: list[Path]) -> tuple[list[Passage], list[list[str]]]:
    """Passages and their words, cached until a file under the root changes."""
    key = (str(root), tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key not in _INDEX_CACHE:
        if len(_INDEX_CACHE) > 8:
            _INDEX_CACHE.clear()
        found = passages(root, files)
        _INDEX_CACHE[key] = (found, [words(p.text) for p in found])
    return _INDEX_CACHE[key]


def _confined_file(root: Path, file: str) -> Path:
    """`file` (relative to root) as a path inside root, or ToolCallError: absolute paths,
    '..' and symlinks that lead out of root are refused."""
    relative = Path(file)
    if relative.is_absolute() or file.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file):
        raise ToolCallError(f"file {file!r} must be a path relative to the document folder")
    if ".." in relative.parts or "\\.." in file or "../" in file.replace("\\", "/"):
        raise ToolCallError(f"file {file!r} may not contain '..'")
    path = root / relative
    if not path.exists():
        raise ToolCallError(f"there is no document {file!r}")
    if not inside(path, root):
        raise ToolCallError(f"file {file!r} leads outside the document folder")
    if not path.resolve().is_file() or path.suffix.lower() not in RETRIEVAL_SUFFIXES:
        raise ToolCallError(f"{file!r} is not a text document ({', '.join(RETRIEVAL_SUFFIXES)})")
    return path


def retrieve(query: str, root: str | Path, top_k: int = 3, file: str | None = None) -> list[tuple[Passage, float]]:
    """The `top_k` passages under `root` (or in `file` only) that best match `query`, by BM25."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ToolCallError(f"the document folder {str(root)!r} does not exist")
    base = base.resolve()
    files = [_confined_file(base, file)] if file else document_files(base)
    found, tokens = _index(base, files)
    scores = bm25_scores(query, tokens)
    ranked = sorted(range(len(found)), key=lambda i: (-scores[i], i))
    return [(found[i], scores[i]) for i in ranked[:top_k] if scores[i] > 0]


@tool(
    "retrieval",
    description="Search the local documents for passages about a query; returns the best passages with their file names.",
    parameters={"type": "object", "properties": {
        "query": {"type": "string", "description": "what to look for"},
        "top_k": {"type": "integer", "description": "how many passages (1-10, default 3)"},
        "file": {"type": "string", "description": "search only this document (a path relative to the document folder)"},
    }, "required": ["query"]},
    options=("root",),
)
def retrieval_tool(query: str, top_k: int = 3, file: str | None = None, root: str | None = None) -> str:
    if root is None:
        raise ToolCallError("retrieval has no document folder; set rollouts.tool_options.retrieval.root")
    if not 1 <= top_k <= 10:
        raise ToolCallError(f"top_k={top_k} must be between 1 and 10")
    hits = retrieve(query, root, top_k, file)
    if not hits:
        return f"no passage matches {query!r}"
    return "\n".join(f"[{k}] {p.file}: {p.text}" for k, (p, _) in enumerate(hits, start=1))

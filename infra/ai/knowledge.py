"""Runbook retrieval: BM25 (bm25s, English stop words and Snowball stemming) over a folder of markdown.

Each file is cut into passages at its ``##`` / ``###`` headings; a passage is indexed with its file's
title and its heading, so "PostgreSQL: too many connections" matches the runbook of that name even when
the section itself says "the pool". The index is rebuilt when the folder changes: every search compares
the files' names, sizes and modification times with those the index was built from (a few ``stat``
calls), and rebuilds in a thread when they differ. No model, no download: it works offline.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bm25s
import Stemmer
import structlog

from application.ports import Passage

log = structlog.get_logger(__name__)

MAX_PASSAGE_CHARS = 1500  # longer sections are cut at paragraph boundaries
_HEADING = re.compile(r"^(#{1,3})\s+(.*\S)\s*$")


@dataclass(frozen=True)
class _Index:
    fingerprint: tuple[tuple[str, int, int], ...]
    passages: tuple[Passage, ...]
    retriever: Any  # bm25s.BM25, or None for an empty folder


class RunbookIndex:
    """:class:`application.ports.KnowledgeBase` over ``folder`` (``*.md``, recursively)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._stemmer = Stemmer.Stemmer("english")
        self._index: _Index | None = None
        self._lock = asyncio.Lock()

    async def search(self, query: str, k: int) -> list[Passage]:
        index = await self._current()
        if index.retriever is None or k <= 0 or not query.strip():
            return []
        tokens = _tokenize([query], self._stemmer, return_ids=False)
        found, scores = index.retriever.retrieve(tokens, k=min(k, len(index.passages)), show_progress=False)
        ranked = [
            (index.passages[int(i)], float(s)) for i, s in zip(found[0], scores[0], strict=True) if s > 0
        ]
        return [Passage(p.id, p.source, p.heading, p.text, round(score, 4)) for p, score in ranked]

    async def _current(self) -> _Index:
        async with self._lock:  # one rebuild at a time; searches meanwhile wait for it
            fingerprint = await asyncio.to_thread(self._fingerprint)
            if self._index is None or self._index.fingerprint != fingerprint:
                self._index = await asyncio.to_thread(self._build, fingerprint)
                log.info("ai.knowledge_indexed", folder=str(self._folder), files=len(fingerprint),
                         passages=len(self._index.passages))  # fmt: skip
            return self._index

    def _files(self) -> list[Path]:
        if not self._folder.is_dir():
            return []
        return sorted(p for p in self._folder.rglob("*.md") if p.is_file())

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        stats = []
        for path in self._files():
            try:
                stat = path.stat()
            except OSError:  # removed meanwhile: the next search sees the folder without it
                continue
            stats.append((str(path.relative_to(self._folder)), stat.st_mtime_ns, stat.st_size))
        return tuple(stats)

    def _build(self, fingerprint: tuple[tuple[str, int, int], ...]) -> _Index:
        passages: list[Passage] = []
        for name, _, _ in fingerprint:
            try:
                text = (self._folder / name).read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                log.warning("ai.runbook_unreadable", file=name, error=str(exc))
                continue
            passages.extend(split_runbook(name, text))
        if not passages:
            log.warning("ai.knowledge_empty", folder=str(self._folder), exists=self._folder.is_dir())
            return _Index(fingerprint, (), None)
        retriever = bm25s.BM25()
        stemmer = Stemmer.Stemmer("english")  # its own: this runs in a thread while searches stem queries
        texts = [_indexed_text(p) for p in passages]
        retriever.index(_tokenize(texts, stemmer, return_ids=True), show_progress=False)
        return _Index(fingerprint, tuple(passages), retriever)


def _tokenize(texts: list[str], stemmer: Any, *, return_ids: bool) -> Any:
    return bm25s.tokenize(
        texts, stopwords="en", stemmer=stemmer.stemWords, return_ids=return_ids, show_progress=False
    )


def split_runbook(source: str, text: str) -> list[Passage]:
    """The passages of one markdown file: one per ``##``/``###`` section (the text before the first
    one, under the title, is a passage too), long sections cut at paragraphs."""
    title = Path(source).stem.replace("-", " ")
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        found = _HEADING.match(line)
        if found and len(found.group(1)) == 1:
            title = found.group(2)
        elif found:
            sections.append((found.group(2), []))
        else:
            sections[-1][1].append(line)
    passages: list[Passage] = []
    seen: set[str] = set()
    for heading, lines in sections:
        body = "\n".join(lines).strip()
        if not body:
            continue
        for n, chunk in enumerate(_chunks(body)):
            anchor = _slug(heading) or "top"
            pid = f"{source}#{anchor}" + (f"-{n + 1}" if n else "")
            while pid in seen:
                pid += "+"
            seen.add(pid)
            passages.append(Passage(pid, source, f"{title} > {heading}" if heading else title, chunk))
    return passages


def _chunks(body: str) -> list[str]:
    chunks: list[str] = []
    current = ""
    for paragraph in re.split(r"\n\s*\n", body):
        if current and len(current) + len(paragraph) + 2 > MAX_PASSAGE_CHARS:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        chunks.append(current)
    return [c[:MAX_PASSAGE_CHARS] for c in chunks]


def _indexed_text(passage: Passage) -> str:
    return f"{passage.heading}\n{passage.text}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

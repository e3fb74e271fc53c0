"""BM25 text search, shared by `retrieval` and `audio_search`."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-case word tokens, as the search tools compare them."""
    return _WORD.findall(text.lower())


def bm25_scores(query: str, documents: Sequence[list[str]], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 of `query` against tokenised `documents` (a word absent from every document adds nothing)."""
    n = len(documents)
    if n == 0:
        return []
    frequency = Counter(w for doc in documents for w in set(doc))
    average = sum(len(d) for d in documents) / n or 1.0
    scores = []
    terms = set(words(query))
    for doc in documents:
        counts = Counter(doc)
        score = 0.0
        for term in terms:
            tf = counts.get(term, 0)
            if tf:
                idf = math.log(1.0 + (n - frequency[term] + 0.5) / (frequency[term] + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / average))
        scores.append(score)
    return scores

"""Closed vocabularies: a T5 snapshot whose tokenizer knows a fixed word list whole and spells anything
else letter by letter (ShapesEval's, `selfe.components.text_snapshots`). A model trained on it never saw a
spelled-out word, so a prompt with one gets an image of something else: the pipeline warns, naming them.

The snapshot says so itself: its config.json carries `"selfe_closed_vocabulary": true`. An open vocabulary
(T5-XXL's SentencePiece, which splits rare words into pieces it was trained on) has no such key.
"""

from __future__ import annotations

import string
from typing import Any

CLOSED_VOCABULARY_KEY = "selfe_closed_vocabulary"
WORD_START = "\u2581"  # SentencePiece's word-start mark, as T5 tokenizers spell it


def closed_vocabulary(t5: Any) -> frozenset[str] | None:
    """The words a T5 encoder's tokenizer knows whole, when its snapshot declares a closed vocabulary;
    None for an open one. t5: a T5TextEncoder (anything with .model.config and .tokenizer)."""
    config = getattr(getattr(t5, "model", None), "config", None)
    if getattr(config, CLOSED_VOCABULARY_KEY, False) is not True:
        return None
    pieces = t5.tokenizer.get_vocab()
    return frozenset(p[1:] for p in pieces if p.startswith(WORD_START) and len(p) > 1)


def unknown_words(prompt: str, vocabulary: frozenset[str]) -> list[str]:
    """The prompt's words (split at white space, punctuation around them stripped) outside `vocabulary`,
    once each, in order. Case counts: the tokenizer has no lower-casing, so "Red" is not "red"."""
    words = (chunk.strip(string.punctuation) for chunk in prompt.split())
    return list(dict.fromkeys(w for w in words if w and w not in vocabulary))

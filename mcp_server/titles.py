"""The duplicate guard's notion of "the same title": what an agent re-planning or retrying would
write again with trivial differences.

Two titles are the same when they match after Unicode compatibility normalization (NFKC: full-width
and half-width forms, ligatures, superscripts, compatibility spaces), with invisible format
characters (zero-width space and joiners, the byte-order mark, bidirectional marks) removed,
case folded (casefold, so "Straße" is "STRASSE"), and runs of whitespace made one space with none
at the ends. A task keeps the digest of that form (`title_key`, 128 bits of SHA-256): fixed-size
in the index however much NFKC expands a title, and compared for equality only. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import unicodedata


def normalized(title: str) -> str:
    """`title` in the form two titles are compared in."""
    text = unicodedata.normalize("NFKC", title)
    text = "".join(char for char in text if unicodedata.category(char) != "Cf")
    # Folding case can undo NFKC (and NFKC can produce text to fold): NFKC again, as NFKC_Casefold does.
    text = unicodedata.normalize("NFKC", text.casefold())
    return " ".join(text.split())


def key(title: str) -> str:
    """The digest a task keeps of its title's normalized form (see the module docstring)."""
    return hashlib.sha256(normalized(title).encode()).hexdigest()[:32]

"""The duplicate guard's notion of "the same title": what an agent re-planning or retrying would
write again with trivial differences.

Two titles are the same when they match after Unicode compatibility normalization (NFKC: full-width
and half-width forms, ligatures, superscripts, compatibility spaces), with what cannot be seen
removed (format characters such as the zero-width space and joiners, the byte-order mark and
bidirectional marks, and the other default-ignorable code points: the combining grapheme joiner,
variation selectors, Mongolian and Khmer invisibles), blank look-alikes (Hangul fillers, the
braille blank) read as spaces, case folded (casefold, so "Straße" is "STRASSE"), and runs of
whitespace made one space with none at the ends. Letters of other scripts that look alike
(a Cyrillic ie, U+0435, for a Latin e) are different letters here: the skeletons of Unicode TS #39
are not applied to titles. A task keeps the digest of that form (`title_key`, 128 bits of
SHA-256): fixed-size in the index however much NFKC expands a title, and compared for equality
only. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import unicodedata

# Default-ignorable code points that are not format characters (Unicode's DerivedCoreProperties).
_IGNORABLE = frozenset(
    [0x034F, 0x17B4, 0x17B5, *range(0x180B, 0x1810), *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)]
)
# Letters and symbols that show as blank space.
_BLANK = frozenset([0x115F, 0x1160, 0x2800, 0x3164, 0xFFA0])


def _seen(char: str) -> str:
    """What a reader sees of `char`: nothing, a space, or the character."""
    code = ord(char)
    if code in _IGNORABLE or unicodedata.category(char) == "Cf":
        return ""
    return " " if code in _BLANK else char


def normalized(title: str) -> str:
    """`title` in the form two titles are compared in."""
    text = unicodedata.normalize("NFKC", title)
    text = "".join(_seen(char) for char in text)
    # Folding case can undo NFKC (and NFKC can produce text to fold): NFKC again, as NFKC_Casefold does.
    text = unicodedata.normalize("NFKC", text.casefold())
    return " ".join(text.split())


def key(title: str) -> str:
    """The digest a task keeps of its title's normalized form (see the module docstring)."""
    return hashlib.sha256(normalized(title).encode()).hexdigest()[:32]

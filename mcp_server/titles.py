"""The duplicate guard's notion of "the same title": what an agent re-planning or retrying would
write again with trivial differences.

Two titles are the same when they match after Unicode compatibility normalization (NFKC: full-width
and half-width forms, ligatures, superscripts, compatibility spaces), with what cannot be seen
removed (format characters such as the zero-width space and joiners, the byte-order mark and
bidirectional marks, and the other default-ignorable code points: the combining grapheme joiner,
variation selectors, Mongolian and Khmer invisibles), blank look-alikes (Hangul fillers, the
braille blank) read as spaces, case folded (casefold, so "Straße" is "STRASSE"), and runs of
whitespace made one space with none at the ends. Letters of other scripts that look alike
(a Cyrillic ie, U+0435, for a Latin e) are different letters in a task's title.

Project names are compared more strictly, since an agent finds a project by its name: the same
form, then its skeleton (Unicode TS #39, section 4: each character mapped to the prototype it
can be confused with, by Unicode's confusables.txt), so "Alpha" spelled with a Cyrillic A (U+0410),
with a zero-width space, or in full-width letters (U+FF21...) reads as "alpha". Case is folded
before the skeleton is taken, so a capital I and a small l (alike in some fonts) do not meet.

An entity keeps the digest of its form (`title_key`, 128 bits of SHA-256): fixed-size in the index
however much NFKC expands a title, and compared for equality only. Pure: no I/O but reading the
confusables once.
"""

from __future__ import annotations

import hashlib
import unicodedata
from functools import cache
from importlib import resources

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


def name_key(name: str) -> str:
    """The digest a project keeps of its name's skeleton (see the module docstring)."""
    return hashlib.sha256(skeleton(normalized(name)).encode()).hexdigest()[:32]


def skeleton(text: str) -> str:
    """UTS #39's skeleton: NFD, each character replaced by its prototype, NFD again."""
    prototypes = _prototypes()
    mapped = "".join(prototypes.get(char, char) for char in unicodedata.normalize("NFD", text))
    return unicodedata.normalize("NFD", mapped)


@cache
def _prototypes() -> dict[str, str]:
    """confusables.txt's mapping, from the compact copy beside this module."""
    mapping: dict[str, str] = {}
    for line in resources.files(__package__).joinpath("confusables.txt").read_text("utf-8").splitlines():
        if line and not line.startswith("#"):
            source, prototype = line.split("\t")
            mapping[chr(int(source, 16))] = "".join(chr(int(code, 16)) for code in prototype.split())
    return mapping

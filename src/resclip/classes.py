"""Class lists: the one parser and validator behind the API, every command and the demo.

A *class* is one line; it may list several synonyms, and every synonym is a *query* with its own text
embedding. Pixel probabilities are later merged over the queries of a class (max), so
``ClassSpec.query_to_class`` maps each query to its class.

The rule, for every entry point (``Segmenter.predict``/``encode_classes``, ``resclip segment``,
``compare``, ``attention``, ``eval --class-file`` and the web demo):

* one class per line (or per list item); in a single string, classes are separated by ``;`` or new
  lines: ``"cat; sofa; sky, clouds"`` is three classes;
* synonyms are separated by commas, with or without a space after them (spaces around each synonym
  are stripped); the first synonym names the class. A comma with no space after it (``"cat,dog"``)
  is warned about, since it is usually meant as two classes: write ``"cat; dog"`` for those;
* an empty class, an empty synonym or text that is not valid (a byte of another encoding than UTF-8,
  which Python passes on as a lone surrogate) is a ``ValueError`` with a one-line message;
* duplicate classes (ignoring case and runs of spaces, as CLIP's tokenizer does) are kept, so class
  indices follow the input, with a warning; so is a synonym shared by several classes;
* a list with a single class is warned about: every pixel gets that class;
* names longer than the text encoder's context are truncated with a warning when they are encoded
  (:func:`resclip.text.encode_queries`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ClassListWarning",
    "ClassSpec",
    "class_warnings",
    "load_classes",
    "parse_classes",
    "read_class_file",
    "split_class_text",
]

ClassesLike = Sequence[str] | str | np.ndarray


class ClassListWarning(UserWarning):
    """A class list that is valid but probably not what was meant (duplicates, ``"cat,dog"``, a single
    class, names truncated by the text encoder)."""


@dataclass(frozen=True)
class ClassSpec:
    """Classes and their queries (synonyms).

    Attributes:
        names: one display name per class (its first synonym), length C.
        queries: every synonym of every class, class by class, length Q >= C.
        query_to_class: the class index of each query, length Q.
    """

    names: tuple[str, ...]
    queries: tuple[str, ...]
    query_to_class: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.queries) != len(self.query_to_class):
            raise ValueError("ClassSpec: queries and query_to_class must have the same length")
        if sorted(set(self.query_to_class)) != list(range(len(self.names))):
            raise ValueError("ClassSpec: query_to_class must use every class index 0..C-1")

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.names)

    @property
    def num_queries(self) -> int:
        """Number of queries Q (all synonyms)."""
        return len(self.queries)


def split_class_text(text: str) -> list[str]:
    """Split one string of classes at ``;`` and new lines; trailing empty classes are dropped."""
    lines = re.split(r"[;\n]", text)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def parse_classes(classes: ClassesLike | ClassSpec, *, where: str | None = None) -> ClassSpec:
    """Parse and check a class list (the rule is in :mod:`resclip.classes`).

    Each class holds one or more synonyms separated by commas, e.g. ``"person, man, woman"``; a comma
    separates synonyms with or without a space after it, and the spaces around each synonym are
    stripped (the reference splits its class files on ``", "``; the result is the same). A single
    string holds several classes separated by ``";"`` or new lines: ``"cat; sofa; sky, clouds"``.

    Duplicate classes are kept (so class indices match the input) with a ``UserWarning``, as is a
    synonym found in several classes, a comma with no space after it (``"cat,dog"`` is one class
    with two synonyms; classes are separated by ``";"``) and a list with a single class (every pixel
    gets it).

    Args:
        classes: a sequence (or 1-D array) of class lines, one string of ``";"``/newline-separated
            classes, or a :class:`ClassSpec` (returned unchanged).
        where: how messages name a class, numbered from 1 (e.g. ``"class file 'x.txt' line"``);
            default ``classes[i]``, numbered from 0.

    Returns:
        The parsed classes.

    Raises:
        ValueError: one line: no classes, an item that is not a string, an empty class or synonym, or
            text that is not valid (a lone surrogate, e.g. from a byte that is not UTF-8).

    Example:
        >>> spec = parse_classes(["sky, clouds", "cat"])
        >>> spec.queries, spec.query_to_class
        (('sky', 'clouds', 'cat'), (0, 0, 1))
    """
    if isinstance(classes, ClassSpec):
        return classes
    lines = _class_lines(classes)
    names: list[str] = []
    queries: list[str] = []
    query_to_class: list[int] = []
    for index, line in enumerate(lines):
        synonyms = _synonyms(line, _label(index, where))
        names.append(synonyms[0])
        queries.extend(synonyms)
        query_to_class.extend([index] * len(synonyms))
    for message in class_warnings(lines):
        warnings.warn(message, ClassListWarning, stacklevel=2)
    return ClassSpec(tuple(names), tuple(queries), tuple(query_to_class))


def _class_lines(classes: object) -> list[str]:
    if isinstance(classes, str):
        lines: list = split_class_text(classes)
    elif isinstance(classes, (Sequence, np.ndarray)) and not isinstance(classes, bytes):
        lines = list(classes)
    else:
        raise ValueError(
            f"classes must be a list of class names or a ';'-separated string, got {type(classes).__name__}"
        )
    if not lines:
        raise ValueError("classes is empty: give at least one class name, e.g. 'cat; sofa; sky, clouds'")
    return lines


def _label(index: int, where: str | None) -> str:
    return f"classes[{index}]" if where is None else f"{where} {index + 1}"


def _synonyms(line: object, label: str) -> list[str]:
    """The stripped synonyms of one class line, or a one-line ``ValueError`` naming it."""
    if not isinstance(line, str):
        raise ValueError(f"{label} must be a string, got {type(line).__name__}: {line!r}")
    if not line.strip():
        raise ValueError(f"{label} is empty or whitespace only (classes are separated by ';' or new lines)")
    bad = next((ch for ch in line if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        byte = f" (the byte 0x{ord(bad) - 0xDC00:02x})" if "\udc80" <= bad <= "\udcff" else ""
        raise ValueError(
            f"{label} ({line.strip()!r}) holds a character that is not valid text{byte}: the names must be "
            "UTF-8 (e.g. a UTF-8 terminal, LANG=C.UTF-8, or a UTF-8 class file); retype them"
        )
    synonyms = [part.strip() for part in line.split(",")]
    for position, synonym in enumerate(synonyms):
        if not synonym:
            raise ValueError(
                f"{label} = {line!r} has an empty synonym at position {position} "
                "(synonyms are separated by commas)"
            )
    return synonyms


def _same_text(name: str) -> str:
    """What CLIP's tokenizer sees: case and runs of whitespace do not matter."""
    return " ".join(name.split()).lower()


def class_warnings(lines: Sequence[str]) -> list[str]:
    """The warnings :func:`parse_classes` gives for valid class lines, one line each.

    Args:
        lines: class lines that passed the checks of :func:`parse_classes`.
    """
    out = []
    keys = [tuple(_same_text(part) for part in line.split(",")) for line in lines]
    repeated = [", ".join(key) for key, count in Counter(keys).items() if count > 1]
    if repeated:
        out.append(f"duplicate class lines {repeated}: they are kept as separate classes with identical "
                   "embeddings")
    else:
        owners: dict[str, set[int]] = {}
        for cls, key in enumerate(keys):
            for query in key:
                owners.setdefault(query, set()).add(cls)
        shared = sorted(query for query, classes in owners.items() if len(classes) > 1)
        if shared:
            out.append(f"synonyms {shared} appear in several classes")
    tight = [line.strip() for line in lines if re.search(r",\S", line)]
    if tight:
        parts = [repr(part.strip()) for part in tight[0].split(",")]
        listed = ", ".join(parts[:-1]) + " and " + parts[-1]
        more = f" (as are {len(tight) - 1} more)" if len(tight) > 1 else ""
        out.append(f"{tight[0]!r} is one class with the synonyms {listed}{more}; "
                   "separate classes with ';' and synonyms with ', '")
    if len(lines) == 1:
        name = lines[0].split(",")[0].strip()
        out.append(f"only one class ({name!r}): every pixel gets this one class; add others, "
                   "e.g. 'background'")
    return out


def read_class_file(path: str | os.PathLike[str]) -> list[str]:
    """Read a class-name file: one class per line, synonyms separated by commas.

    Args:
        path: a UTF-8 text file (a byte-order mark is ignored; ``\\r\\n`` line ends are accepted).

    Returns:
        The lines, without line ends; trailing empty lines are dropped, other lines are kept as they are
        (empty ones then fail in :func:`parse_classes`, which also strips the synonyms).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid UTF-8.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"class file {os.fspath(path)!r} is not valid UTF-8 (byte {exc.start}); save it as UTF-8"
        ) from exc
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def load_classes(text: str | None = None, path: str | os.PathLike[str] | None = None) -> ClassSpec:
    """Parse classes given as one string (``"cat; sofa; sky, clouds"``) or as a class-name file.

    Messages name a class as ``class N`` or ``class file 'x.txt' line N`` (numbered from 1).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: neither or both given, or a class list that :func:`parse_classes` rejects.
    """
    if (text is None) == (path is None):
        raise ValueError("give the class names either as text (\"cat; sofa; sky, clouds\") or as a file")
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"class file not found: {os.fspath(path)!r}")
        return parse_classes(read_class_file(path), where=f"class file {os.fspath(path)!r} line")
    return parse_classes(str(text), where="class")

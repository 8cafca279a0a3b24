"""Real English prose found on the machine, for the end-to-end benchmark.

Two kinds, alternated so that any first N differ in style: license texts from
Debian's ``/usr/share/common-licenses`` (legal prose) and sections of Python's
own reference manual shipped in the standard library as ``pydoc_data.topics``
(technical prose with code). Each is read from its beginning; a source that is
missing or shorter than the requested tokens is skipped.
"""

import pathlib

LICENSES = pathlib.Path("/usr/share/common-licenses")

#: (label, loader) in the order they are used.
SOURCES = (
    ("GPL-3.0 license", ("file", LICENSES / "GPL-3")),
    ("Python reference: compound statements", ("pydoc", "compound")),
    ("Apache-2.0 license", ("file", LICENSES / "Apache-2.0")),
    ("Python reference: data model, special method names", ("pydoc", "specialnames")),
    ("MPL-2.0 license", ("file", LICENSES / "MPL-2.0")),
    ("Python reference: built-in types", ("pydoc", "types")),
    ("GFDL-1.3 license", ("file", LICENSES / "GFDL-1.3")),
    ("Python reference: format strings", ("pydoc", "formatstrings")),
)


def _read(kind, where):
    if kind == "file":
        try:
            return where.read_text(encoding="utf-8")
        except OSError:
            return None
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return None
    return topics.get(where)


def load_texts(tokenizer, count, tokens):
    """``count`` (label, ids) pairs: the first ``tokens`` token ids (list of int) of each source."""
    out = []
    for label, (kind, where) in SOURCES:
        text = _read(kind, where)
        if text is None:
            continue
        ids = tokenizer(text).input_ids
        if len(ids) >= tokens:
            out.append((label, ids[:tokens]))
        if len(out) == count:
            return out
    raise RuntimeError(f"only {len(out)} of the texts in bench/texts.py have {tokens} tokens; asked for {count}")


def long_text(tokenizer, tokens):
    """(labels, ids): whole sources concatenated (separated by a blank line) until ``tokens`` token ids."""
    labels, ids = [], []
    for label, (kind, where) in SOURCES:
        text = _read(kind, where)
        if text is None:
            continue
        labels.append(label)
        ids.extend(tokenizer(text + "\n\n").input_ids)
        if len(ids) >= tokens:
            return labels, ids[:tokens]
    raise RuntimeError(f"the texts in bench/texts.py hold {len(ids)} tokens together; asked for {tokens}")

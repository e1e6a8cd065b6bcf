"""Generated tables inside hand-written Markdown: the text between ``<!-- NAME -->`` and
``<!-- /NAME -->`` is replaced, the rest of the file kept (README.md and docs/ embed the tables that
the study scripts compute from their committed run files)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import atomic_write


def update_marked(path: str | Path, marker: str, text: str, inline: bool = False) -> bool:
    """Put ``text`` between ``<!-- marker -->`` and ``<!-- /marker -->`` in ``path``, on lines of its
    own unless ``inline``. Returns whether the file changed; a file or marker pair that is not there
    is left alone (``False``)."""
    path = Path(path)
    if not path.is_file():
        return False
    old = path.read_text()
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start not in old or end not in old.split(start, 1)[1]:
        return False
    head, rest = old.split(start, 1)
    _, tail = rest.split(end, 1)
    body = text if inline else f"\n{text}\n"
    new = f"{head}{start}{body}{end}{tail}"
    if new == old:
        return False
    with atomic_write(path) as tmp:
        tmp.write_text(new)
    return True

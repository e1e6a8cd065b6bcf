"""``python -m expandctl.data``: the registered data sources; ``--markdown`` prints docs/train.md's table,
``--write FILE`` regenerates that table between FILE's markers (``--check FILE``: exit 1 if it differs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .registry import markdown_table, sources, sync_docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expandctl.data", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--markdown", action="store_true", help="print the Markdown table of the sources")
    group.add_argument("--write", metavar="FILE", type=Path, help="regenerate FILE's table (docs/train.md)")
    group.add_argument("--check", metavar="FILE", type=Path, help="exit 1 if FILE's table is not the registry's")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(), end="")
    elif args.write or args.check:
        path = args.write or args.check
        old = path.read_text()
        new = sync_docs(old)
        if args.check:
            print(f"{path}: {'in step with' if new == old else 'differs from'} the data registry")
            return int(new != old)
        if new != old:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(new)
            tmp.replace(path)
        print(f"{path}: {'rewritten' if new != old else 'already in step'}")
    else:
        width = max(len(s.grammar) for s in sources())
        for s in sources():
            print(f"{s.grammar:<{width}}  {s.help}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

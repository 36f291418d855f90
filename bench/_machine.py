"""The lines every benchmark's JSON carries about where it ran (the library's, so that
`moe-edge bench` and these scripts say the same) and what code it measured."""

import json
import subprocess
from pathlib import Path

from moe_edge.info import machine

__all__ = ["machine", "commit", "emit"]


def commit() -> str:
    """HEAD, and which moe_edge/ files differ from it (they change what is measured)."""
    root = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout  # noqa: E731
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "moe_edge").splitlines()]  # "XY path"
    return git("rev-parse", "--short", "HEAD").strip() + (f" + uncommitted {', '.join(dirty)}" if dirty else "")


def emit(result: dict, out: str | Path | None = None) -> None:
    """A benchmark's result: printed as JSON, and written to `out` when given."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).write_text(text + "\n")
    print(text)

"""The teaching notebooks on the site, with their outputs.

``notebooks/*.ipynb`` are stored without outputs (a test checks it), so that a diff shows only
what changed. The site renders executed copies of them, kept in ``docs/tutorials/notebooks/``:

    python docs/.hooks/notebooks.py          # execute every notebook in a fresh kernel, write the copies

As an MkDocs hook, this module fails the build when a copy is missing, was not executed, or
holds cells that differ from its notebook's: run the command above after editing a notebook.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "notebooks"
COPIES = ROOT / "docs" / "tutorials" / "notebooks"


def problems() -> list[str]:
    """Why the rendered copies do not match the notebooks (empty: they do)."""
    import nbformat

    found = []
    sources = sorted(SOURCES.glob("*.ipynb"))
    names = {path.name for path in sources}
    found += [f"{copy.name} has no notebook in notebooks/ any more" for copy in COPIES.glob("*.ipynb")
              if copy.name not in names]
    for path in sources:
        copy = COPIES / path.name
        if not copy.exists():
            found.append(f"{path.name} has no rendered copy in docs/tutorials/notebooks/")
            continue
        mine = nbformat.read(path, as_version=4).cells
        theirs = nbformat.read(copy, as_version=4).cells
        if [(c.cell_type, c.source) for c in mine] != [(c.cell_type, c.source) for c in theirs]:
            found.append(f"{path.name}: its rendered copy holds other cells")
        elif not any(c.get("outputs") for c in theirs if c.cell_type == "code"):
            found.append(f"{path.name}: its rendered copy was not executed")
    return found


def on_pre_build(config: Any, **kwargs: Any) -> None:
    """Fail the build when the rendered notebooks are out of date."""
    from mkdocs.exceptions import PluginError

    found = problems()
    if found:
        raise PluginError("the rendered teaching notebooks are out of date (run python docs/.hooks/notebooks.py): "
                          + "; ".join(found))


def render() -> None:
    """Execute every notebook in a fresh kernel in a scratch folder and store the executed copy."""
    import nbformat
    from nbclient import NotebookClient

    COPIES.mkdir(parents=True, exist_ok=True)
    for stale in COPIES.glob("*.ipynb"):
        stale.unlink()
    for path in sorted(SOURCES.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory(prefix="sitq-render-") as folder:
            NotebookClient(nb, timeout=180, kernel_name="python3", store_widget_state=True,
                           resources={"metadata": {"path": folder}}).execute()
        nbformat.write(nb, COPIES / path.name)
        print(f"rendered {path.name}")


if __name__ == "__main__":
    render()
    sys.exit(1 if problems() else 0)

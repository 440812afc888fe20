"""The teaching notebooks on the site, with their outputs.

``notebooks/*.ipynb`` are stored without outputs (a test checks it), so that a diff shows only
what changed. The site renders executed copies of them, kept in ``docs/tutorials/notebooks/``:

    python docs/.hooks/notebooks.py          # execute every notebook in a fresh kernel, write the copies

A static page cannot run widgets, so each widget in a copy is replaced by static HTML: a
task's widget by its task's final result or traceback, read from the store the notebook used,
as the live widget shows it once the task ends; any other widget (the board) by its last state
as the kernel saved it, or the HTML it offered when it was displayed.

As an MkDocs hook, this module fails the build when a copy is missing, was not executed, or
holds cells that differ from its notebook's: run the command above after editing a notebook.
"""

from __future__ import annotations

import re
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
        elif any(WIDGET_VIEW in o.get("data", {}) for c in theirs for o in c.get("outputs", [])):
            found.append(f"{path.name}: its rendered copy holds live widgets, which a static page cannot show")
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
            freeze_widgets(nb, _final_results(nb, Path(folder)))
        nbformat.write(nb, COPIES / path.name)
        print(f"rendered {path.name}")


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


TASK_ID = re.compile(r'<code class="sitq-id"[^>]*>([0-9a-f]{32})</code>')


def _final_results(nb: Any, folder: Path) -> dict[str, str]:
    """The result HTML of every task a widget of ``nb`` showed, from the stores in ``folder``."""
    from sitq import SyncTaskQueue
    from sitq.notebook.render import result_html

    ids = {m for cell in nb.cells for output in cell.get("outputs", []) if WIDGET_VIEW in output.get("data", {})
           for m in TASK_ID.findall(output["data"].get("text/html", ""))}
    found: dict[str, str] = {}
    for store in folder.glob("*.db"):
        with SyncTaskQueue(store) as queue:
            for task_id, result in queue.get_results(sorted(ids - found.keys())).items():
                if result.status in ("success", "failed", "cancelled"):
                    found[task_id] = result_html(result, queue.deserialize_result)
    return found


def freeze_widgets(nb: Any, results: dict[str, str]) -> None:
    """Replace every widget output by static HTML (see the module docstring); drop the widget state."""
    state = nb.metadata.pop("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW not in data:
                continue
            model_id = data.pop(WIDGET_VIEW)["model_id"]
            shown = TASK_ID.findall(data.get("text/html", ""))
            if len(shown) == 1 and shown[0] in results:
                data["text/html"] = results[shown[0]]
            elif re.sub(r"<[^>]*>", "", html := _widget_html(model_id, state)).strip():
                data["text/html"] = html  # else: the HTML it offered when it was displayed


def _widget_html(model_id: str, state: dict[str, Any]) -> str:
    import html

    model = state.get(model_id)
    if model is None:
        return ""
    name, fields = model["model_name"], model["state"]
    if fields.get("layout") and state.get(fields["layout"].removeprefix("IPY_MODEL_"), {}).get(
            "state", {}).get("display") == "none":
        return ""
    if name in ("VBoxModel", "HBoxModel", "BoxModel", "GridBoxModel", "AccordionModel", "TabModel"):
        direction = "row" if name == "HBoxModel" else "column"
        inner = "".join(_widget_html(child.removeprefix("IPY_MODEL_"), state) for child in fields.get("children", []))
        classes = " ".join(fields.get("_dom_classes", []))
        return f'<div class="{classes}" style="display: flex; flex-direction: {direction}; gap: 4px">{inner}</div>'
    if name in ("HTMLModel", "HTMLMathModel"):
        return str(fields.get("value", ""))
    if name in ("FloatProgressModel", "IntProgressModel"):
        value, top = fields.get("value", 0), fields.get("max", 100)
        return f'<progress value="{value}" max="{top}" style="width: 20em"></progress>'
    if name in ("ButtonModel", "ToggleButtonModel"):
        return f'<button disabled>{html.escape(str(fields.get("description", "")))}</button>'
    if name in ("LabelModel", "TextModel"):
        return html.escape(str(fields.get("value", "")))
    return ""


if __name__ == "__main__":
    render()
    sys.exit(1 if problems() else 0)

"""Every notebook in notebooks/ runs top to bottom in a real kernel, without
errors, and is stored without outputs."""

import shutil

import pytest

pytest.importorskip("nbclient")
import nbformat
from notebook_support import REPO, execute

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

pytestmark = pytest.mark.timeout(180)


def test_there_is_a_notebook_for_every_topic():
    names = " ".join(path.stem for path in NOTEBOOKS)
    for topic in ("quickstart", "background", "failures", "processes", "delayed", "board",
                  "restart"):
        assert topic in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    copy = tmp_path / path.name  # run in a scratch folder: its sitq.db stays there
    shutil.copy(path, copy)
    nb = execute(nbformat.read(copy, as_version=4), tmp_path, timeout=120)
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert [out for out in outputs if out.output_type == "error"] == []
    results = [out.data for out in outputs if out.output_type == "execute_result"
               and out.data.get("text/plain", "").startswith("<Result ")]
    assert all('class="sitq-result ' in data.get("text/html", "") for data in results)  # drawn, not repr'd
    if path.stem.startswith("03-"):
        assert len(results) == 2  # the failures notebook shows its results

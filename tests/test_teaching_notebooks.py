"""Every notebook in notebooks/ runs top to bottom in a real kernel, without
errors, and is stored without outputs: in this interpreter's kernel, and in a
kernel on each Python sitq supports (3.10 to 3.13), in a venv made for it under
.venv-kernels/. A Python that is not installed is skipped, and says so."""

import os
import shutil
import sys

import pytest

pytest.importorskip("nbclient")
import nbformat
from notebook_support import PYTHONS, REPO, execute, kernel_on

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

pytestmark = pytest.mark.timeout(180)


def test_there_is_a_notebook_for_every_topic():
    names = " ".join(path.stem for path in NOTEBOOKS)
    for topic in ("quickstart", "background", "failures", "processes", "delayed", "board",
                  "restart", "scaling-out-on-postgresql", "run-after-run-once", "map"):
        assert topic in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.fixture(scope="session", params=PYTHONS)
def kernel(request, tmp_path_factory):
    """A kernel name for each supported Python: this interpreter's own for its version."""
    version = request.param
    if version == f"{sys.version_info.major}.{sys.version_info.minor}":
        return "python3"
    specs = tmp_path_factory.mktemp("kernelspecs")
    name = kernel_on(version, specs)
    if name is None:
        pytest.skip(f"Python {version} is not installed (no python{version} on PATH or under ~/.pyenv/versions); "
                    "the teaching notebooks were not run on it")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(specs), *filter(None, [os.environ.get("JUPYTER_PATH")])])
    return name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, kernel):
    copy = tmp_path / path.name  # run in a scratch folder: its sitq.db stays there
    shutil.copy(path, copy)
    nb = execute(nbformat.read(copy, as_version=4), tmp_path, timeout=120, kernel_name=kernel)
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert [out for out in outputs if out.output_type == "error"] == []
    results = [out.data for out in outputs if out.output_type == "execute_result"
               and out.data.get("text/plain", "").startswith("<Result ")]
    assert all('class="sitq-result ' in data.get("text/html", "") for data in results)  # drawn, not repr'd
    if path.stem.startswith("03-"):
        assert len(results) == 2  # the failures notebook shows its results

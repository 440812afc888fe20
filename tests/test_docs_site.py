"""The site renders what the repository holds: every teaching notebook has an executed copy in
docs/tutorials/notebooks/ with the same cells (``python docs/.hooks/notebooks.py`` makes them),
and every page of docs/ is in the site's navigation."""

import importlib.util

import pytest
from conftest import PROJECT

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the docs extra (pip install -e '.[docs]')")


def _hook():
    spec = importlib.util.spec_from_file_location("notebook_hook", PROJECT / "docs" / ".hooks" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_notebooks_match_the_notebooks():
    assert _hook().problems() == []


def _nav_paths(items):
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            yield from _nav_paths(value)
        else:
            yield value


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load((PROJECT / "mkdocs.yml").read_text().replace("!!python", "#"))
    in_nav = set(_nav_paths(config["nav"]))
    docs = PROJECT / "docs"
    pages = {str(p.relative_to(docs)) for p in docs.rglob("*.md") if ".hooks" not in p.parts}
    pages |= {str(p.relative_to(docs)) for p in (docs / "tutorials" / "notebooks").glob("*.ipynb")}
    assert pages - in_nav == set()
    assert in_nav - pages == set()

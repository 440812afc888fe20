"""Every public name of sitq's public modules says what it does: the API reference (made from
these docstrings) shows no undocumented public name, and ``help(sitq.TaskQueue)`` is useful."""

import importlib
import inspect

import pytest

PUBLIC_MODULES = [
    "sitq", "sitq.core", "sitq.queue", "sitq.sync", "sitq.worker", "sitq.options", "sitq.errors", "sitq.backends",
    "sitq.backends.base", "sitq.backends.rules", "sitq.backends.notify", "sitq.backends.memory",
    "sitq.backends.sqlite", "sitq.serialization", "sitq.signing", "sitq.notebook",
]


def public_members(cls):
    """The public methods and properties a class defines itself (not those of object or a builtin)."""
    for name, value in vars(cls).items():
        if name.startswith("_") or not (inspect.isfunction(value) or isinstance(value, (property, classmethod,
                                                                                       staticmethod))):
            continue
        yield name, getattr(cls, name)


def undocumented(module_name):
    module = importlib.import_module(module_name)
    missing = [] if inspect.getdoc(module) else [module_name]
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants and aliases are described in their module's docstring
        if obj.__module__.split(".")[0] != "sitq":
            continue
        if not inspect.getdoc(obj):
            missing.append(f"{module_name}.{name}")
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            missing += [f"{module_name}.{name}.{member}" for member, value in public_members(obj)
                        if not inspect.getdoc(value)]
    return missing


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name):
    assert undocumented(module_name) == []


def test_every_public_module_has_a_reference_page():
    from conftest import PROJECT

    pages = {p.stem for p in (PROJECT / "docs" / "reference" / "api").glob("*.md")}
    assert pages == set(PUBLIC_MODULES)


DOCTESTED = ["sitq.core", "sitq.options", "sitq.backends", "sitq.backends.rules"]


@pytest.mark.parametrize("module_name", DOCTESTED)
def test_reference_examples_run_as_shown(module_name):
    """The examples in the reference (``>>>`` lines in docstrings) print what they show."""
    import doctest

    module = importlib.import_module(module_name)
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.attempted > 0, f"{module_name} has no examples to run"
    assert results.failed == 0

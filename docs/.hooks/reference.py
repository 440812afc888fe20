"""MkDocs hook: reference pages generated from the code itself at build time.

A page that holds one of these markers gets it replaced by text made from sitq's own
objects, so the reference cannot drift from what the code does:

- ``<!-- sitq:cli -->``: every ``sitq`` command with its usage and options, from the
  command line's argparse parser (``sitq.cli.parser``);
- ``<!-- sitq:magics -->``: every ``%sitq`` subcommand and ``%%sitq``, from the parsers
  the magics parse with (``sitq.notebook.magics``);
- ``<!-- sitq:exports -->``: every name ``sitq`` exports, with a link to the page of the
  module that defines it;
- ``<!-- sitq:configuration -->``: the settings of the queue, the worker, the notebook's
  worker and the task options, with their defaults, from their signatures and dataclass
  fields, and the environment variables sitq reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from typing import Any

MARKERS = re.compile(r"<!-- sitq:(cli|magics|configuration|exports) -->")


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return MARKERS.sub(lambda m: GENERATORS[m.group(1)](), markdown)


def _usage_block(parser: argparse.ArgumentParser) -> str:
    text = parser.format_help().rstrip()
    return f"```text\n{text}\n```"


def cli() -> str:
    from sitq.cli import parser

    top = parser()
    parts = ["## sitq", _usage_block(top)]
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        sub.prog = f"sitq {name}"
        parts += [f"## sitq {name}", _usage_block(sub)]
    return "\n\n".join(parts)


def magics() -> str:
    from sitq.notebook import magics as module

    parts = []
    for name, sub in module._PARSERS.items():
        parts += [f"## %sitq {name}", _usage_block(sub)]
    parts += ["## %%sitq", _usage_block(module._CELL_PARSER)]
    return "\n\n".join(parts)


def _default(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    text = repr(value)
    if callable(value) and hasattr(value, "__qualname__"):
        text = f"{getattr(value, '__module__', '')}.{value.__qualname__}".lstrip(".")
    return f"`{text}`"


def _signature_table(title: str, func: Any, skip: tuple[str, ...] = ("self",)) -> str:
    rows = ["| setting | default |", "| --- | --- |"]
    for name, param in inspect.signature(func).parameters.items():
        if name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        rows.append(f"| `{name}` | {_default(param.default)} |")
    return f"## {title}\n\n" + "\n".join(rows)


def configuration() -> str:
    import sitq
    from sitq.backends.sqlite import SQLiteBackend
    from sitq.notebook.runtime import start_worker
    from sitq.options import TaskOptions

    parts = [
        _signature_table("TaskQueue", sitq.TaskQueue.__init__),
        _signature_table("SyncTaskQueue", sitq.SyncTaskQueue.__init__),
        _signature_table("Worker", sitq.Worker.__init__),
        _signature_table("SQLiteBackend", SQLiteBackend.__init__),
        *_postgres_table(),
        _signature_table("sitq.notebook.start_worker (and %sitq start)", start_worker),
    ]
    fields = ["| option | default |", "| --- | --- |"]
    for field in dataclasses.fields(TaskOptions):
        fields.append(f"| `{field.name}` | {_default(field.default)} |")
    parts.append("## Task options (sitq.task, .options)\n\n" + "\n".join(fields))
    return "\n\n".join(parts)


def _postgres_table() -> list[str]:
    try:
        from sitq.backends.postgres import PostgresBackend
    except ImportError:  # the postgres extra is not installed where the site is built
        return []
    return [_signature_table("PostgresBackend (postgresql:// stores)", PostgresBackend.__init__)]


def exports() -> str:
    import sitq

    rows = ["| name | defined in |", "| --- | --- |"]
    for name in sorted(sitq.__all__, key=str.lower):
        module = _reference_module(getattr(getattr(sitq, name), "__module__", "sitq"))
        rows.append(f"| `{name}` | [`{module}`]({module}.md#{module}.{name}) |")
    return "\n".join(rows)


def _reference_module(module: str) -> str:
    """The module whose reference page documents names of ``module`` (a package's page shows its
    submodules' public names)."""
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent / "reference" / "api"
    while not (here / f"{module}.md").exists() and "." in module:
        module = module.rpartition(".")[0]
    return module


GENERATORS = {"cli": cli, "magics": magics, "configuration": configuration, "exports": exports}

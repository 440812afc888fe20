"""Turning calls and values into bytes and back, with errors that say what failed.

A task is stored as two blobs: the function, and its ``(args, kwargs)``. The
function is pickled once per ``enqueue`` or ``map`` call, so mapping a
notebook-defined function over ten thousand inputs pickles it once.
cloudpickle pickles functions defined in ``__main__`` (a notebook) by value,
so any worker process can run them. It also keeps each function's file name
and, for code that exists only in memory (a notebook cell), its source lines,
so a remote traceback shows the lines that failed.
"""

from __future__ import annotations

import io
import linecache
import os
import pickle
import types
import weakref
from collections.abc import Callable
from typing import IO, Any

import cloudpickle

from sitq.errors import SerializationError

__all__ = [
    "CODE_LABELS",
    "Serializer",
    "CloudpickleSerializer",
    "describe_callable",
    "dumps_shipping_source",
    "loads_shipped",
    "set_code_labeller",
]

CODE_LABELS: dict[str, str] = {}
"""How tracebacks name the files of code that exists only in memory: a notebook cell's
file name (``/tmp/ipykernel_1/123.py``) -> ``"Cell In[7]"``. Filled wherever such code is
unpickled, from the labels pickled with it; :mod:`sitq.worker.failures` reads it."""

_labeller: Callable[[str], str | None] | None = None


def set_code_labeller(labeller: Callable[[str], str | None] | None) -> None:
    """Name code files as they are pickled: ``labeller(filename)`` returns a label such as
    ``"Cell In[7]"``, or None. The notebook layer sets one that asks IPython, which knows
    which cell each file is; the label travels with the pickled code."""
    global _labeller
    _labeller = labeller


def describe_callable(func: Callable[..., Any]) -> str:
    """A short, readable name for a task function: ``module.qualname``."""
    name: str | None = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if name is None:
        inner = getattr(func, "func", None)  # functools.partial
        return f"partial({describe_callable(inner)})" if inner is not None else type(func).__name__
    module = getattr(func, "__module__", None)
    if module in (None, "__main__", "builtins"):
        return name
    return f"{module}.{name}"


class Serializer:
    """Bytes in, objects out. Subclass it to change the format of payloads.

    ``dumps`` and ``loads`` must be inverse; the queue and every worker that
    shares a store must use compatible serializers.
    """

    def dumps(self, obj: Any) -> bytes:
        """``obj`` as bytes. Subclasses implement this and :meth:`loads`."""
        raise NotImplementedError

    def loads(self, data: bytes) -> Any:
        """The object :meth:`dumps` turned into ``data``."""
        raise NotImplementedError

    def dumps_function(self, func: Callable[..., Any]) -> bytes:
        """The task function as bytes, or a :class:`SerializationError` that names it and says why not."""
        try:
            return self.dumps(func)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle the task function {describe_callable(func)}: {exc}. "
                "Functions that close over open files, locks, sockets or database "
                "connections cannot travel to a worker; create those inside the function."
            ) from exc

    def dumps_arguments(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        """``(args, kwargs)`` as bytes, or a :class:`SerializationError` naming the first argument
        that cannot be pickled."""
        try:
            return self.dumps((args, kwargs))
        except Exception as exc:
            raise self._argument_error(func, args, kwargs, exc) from exc

    def _argument_error(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception
    ) -> SerializationError:
        """Find the first argument that does not pickle, to name it in the message."""
        labelled = [(f"argument {i + 1}", a) for i, a in enumerate(args)]
        labelled += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
        for label, value in labelled:
            try:
                self.dumps(value)
            except Exception as inner:
                return SerializationError(
                    f"cannot pickle {label} of {describe_callable(func)}(): "
                    f"{type(value).__name__} {_short_repr(value)} ({inner}). "
                    "Pass something a worker can rebuild instead, such as a path or plain data."
                )
        return SerializationError(f"cannot pickle the arguments of {describe_callable(func)}(): {exc}")

    def dumps_value(self, value: Any) -> bytes:
        """A task's return value as bytes, or a :class:`SerializationError` saying what it was."""
        try:
            return self.dumps(value)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle the return value, a {type(value).__name__} "
                f"{_short_repr(value)}: {exc}. Return plain data instead."
            ) from exc

    def loads_call(self, func: bytes, args: bytes) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """Rebuild ``(func, args, kwargs)`` in a worker."""
        try:
            fn = self.loads(func)
        except Exception as exc:
            raise _unloadable("task", exc) from exc
        return (fn, *self.loads_args(args))

    def loads_args(self, args: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Rebuild ``(args, kwargs)`` in a worker that has the task's function already."""
        try:
            call_args, call_kwargs = self.loads(args)
        except Exception as exc:
            raise _unloadable("task's arguments", exc) from exc
        return call_args, call_kwargs


def _unloadable(what: str, exc: Exception) -> SerializationError:
    return SerializationError(
        f"cannot unpickle the {what} in this worker: {type(exc).__name__}: {exc}. "
        "The worker needs the same importable modules (and their versions) as the "
        "process that enqueued the task."
    )


class ShippedSource:
    """A pickled object with the source lines of code in it that lives only in memory."""

    def __init__(self, obj: Any, sources: dict[str, list[str]], labels: dict[str, str] | None = None) -> None:
        self.obj = obj
        self.sources = sources
        self.labels = labels or {}

    def install(self) -> Any:
        """Make the source lines known to ``linecache`` here, and the files' labels to
        :data:`CODE_LABELS`, for tracebacks, and return the object."""
        for filename, lines in self.sources.items():
            if filename not in linecache.cache:
                linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
        CODE_LABELS.update(getattr(self, "labels", None) or {})  # pickles of older versions have none
        return self.obj


_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)


class _SourceKeepingPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no types
    """cloudpickle, but code objects keep their file name and note their in-memory source."""

    def __init__(self, file: IO[bytes], protocol: int | None = None) -> None:
        super().__init__(file, protocol=protocol)
        self.sources: dict[str, list[str]] = {}
        self.labels: dict[str, str] = {}

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType and _code_reduce is not None:
            return self._reduce_code(obj)
        return super().reducer_override(obj)

    def _reduce_code(self, code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
        assert _code_reduce is not None  # reducer_override checked
        rebuild, fields = _code_reduce(code)
        filename = code.co_filename
        if filename not in self.sources and not os.path.exists(filename):
            lines = linecache.getlines(filename)
            if lines:
                self.sources[filename] = lines
        if filename not in self.labels:
            label = CODE_LABELS.get(filename) or (_labeller(filename) if _labeller is not None else None)
            if label:
                self.labels[filename] = label
        return rebuild, tuple(filename if field == "<dynamic-code>" else field for field in fields)


def dumps_shipping_source(obj: Any) -> bytes:
    """cloudpickle ``obj`` so that the code in it keeps its file names and, for code that
    exists only in memory (a notebook cell), its source lines; :func:`loads_shipped` undoes it."""
    data, sources, labels = _dumps(obj)
    if sources or labels:
        data, _, _ = _dumps(ShippedSource(obj, sources, labels))
    return data


def loads_shipped(data: bytes) -> Any:
    """Unpickle what :func:`dumps_shipping_source` made, putting its in-memory sources back for tracebacks."""
    obj = pickle.loads(data)
    return obj.install() if isinstance(obj, ShippedSource) else obj


def _dumps(obj: Any) -> tuple[bytes, dict[str, list[str]], dict[str, str]]:
    buffer = io.BytesIO()
    pickler = _SourceKeepingPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.sources, pickler.labels


class CloudpickleSerializer(Serializer):
    """The default: cloudpickle out (keeping in-memory source for tracebacks), pickle in.

    Two shortcuts keep enqueueing cheap: a module-level function, which
    cloudpickle pickles by reference (its module and name), is pickled once
    per serializer; and arguments that are all plain numbers, strings, bytes
    or None (and return values that are one of those) are pickled by the
    standard pickler, which writes the same bytes faster. A function defined
    in a notebook is pickled anew on every call, with the values its globals
    have at that moment.
    """

    def __init__(self) -> None:
        self._by_reference: weakref.WeakKeyDictionary[Callable[..., Any], bytes] = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        # A process worker sends its serializer to its processes; the cache stays here.
        state = self.__dict__.copy()
        state.pop("_by_reference", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._by_reference = weakref.WeakKeyDictionary()

    def dumps(self, obj: Any) -> bytes:
        return dumps_shipping_source(obj)

    def loads(self, data: bytes) -> Any:
        return loads_shipped(data)

    def dumps_function(self, func: Callable[..., Any]) -> bytes:
        if type(func) is not types.FunctionType:
            return super().dumps_function(func)
        data = self._by_reference.get(func)
        if data is None:
            data = super().dumps_function(func)
            if _should_pickle_by_reference is not None and _should_pickle_by_reference(func):
                self._by_reference[func] = data
        return data

    def dumps_arguments(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        if all(type(a) in _PLAIN for a in args) and all(type(v) in _PLAIN for v in kwargs.values()):
            return pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        return super().dumps_arguments(func, args, kwargs)

    def dumps_value(self, value: Any) -> bytes:
        if type(value) in _PLAIN:  # most values of short tasks: the standard pickler writes the same bytes
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return super().dumps_value(value)


_PLAIN = frozenset((int, float, complex, str, bytes, bool, type(None)))
_should_pickle_by_reference = getattr(getattr(cloudpickle, "cloudpickle", None), "_should_pickle_by_reference", None)


def _short_repr(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."

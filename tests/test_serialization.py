"""What travels in a payload: functions by reference or by value, arguments, source lines."""

import linecache
import pickle

import taskfuncs

from sitq import CloudpickleSerializer


def test_module_functions_travel_by_reference_and_are_pickled_once():
    serializer = CloudpickleSerializer()
    first = serializer.dumps_function(taskfuncs.add)
    assert serializer.dumps_function(taskfuncs.add) is first  # cached
    assert pickle.loads(first) is taskfuncs.add
    assert len(first) < 100  # a reference: module and name, no code


def test_notebook_functions_are_pickled_anew_with_current_globals():
    namespace = {"__name__": "__main__", "SCALE": 2}
    exec("def scaled(x):\n    return x * SCALE\n", namespace)
    serializer = CloudpickleSerializer()
    before = serializer.dumps_function(namespace["scaled"])
    namespace["SCALE"] = 10
    after = serializer.dumps_function(namespace["scaled"])
    assert serializer.loads(before)(3) == 6
    assert serializer.loads(after)(3) == 30


def test_plain_and_rich_arguments_round_trip():
    serializer = CloudpickleSerializer()
    for args, kwargs in [((1, 2.5, "x", b"y", None, True), {"k": 3}), ((lambda v: v + 1,), {}), (([1, {2}],), {})]:
        func, back_args, back_kwargs = serializer.loads_call(
            serializer.dumps_function(taskfuncs.add), serializer.dumps_arguments(taskfuncs.add, args, kwargs)
        )
        assert func is taskfuncs.add and back_kwargs == kwargs
        if callable(args[0]):
            assert back_args[0](1) == 2
        else:
            assert back_args == args


def test_code_that_lives_only_in_memory_brings_its_source_lines():
    source = "def boom(x):\n    y = x - x\n    return 1 / y\n"
    filename = "<cell 12>"
    namespace = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    data = CloudpickleSerializer().dumps_function(namespace["boom"])
    del linecache.cache[filename]  # as in another process
    func = CloudpickleSerializer().loads(data)
    assert func.__code__.co_filename == filename
    assert linecache.getline(filename, 3) == "    return 1 / y\n"

"""
Plain-Python configuration, exec'd by train.py, eval.py, bench.py and assets/build_base.py after they define their globals:

    python train.py config/some_overrides.py --batch_size=8 --perturb_at=aligner

A config file is Python that assigns some of the globals. A --key=value flag overrides one global;
its value is parsed as a Python literal when it is one (8, 1e-3, True, 'x') and kept as a string
otherwise. Unknown keys and values of the wrong type are errors, named, at start-up.
"""

import ast
import difflib
import sys

_known = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


def _fail(msg):
    raise SystemExit(f"config error: {msg}")


def _check_key(key):
    if key not in _known:
        close = difflib.get_close_matches(key, list(_known), n=3, cutoff=0.6)
        _fail(f"unknown key '{key}'" + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""))


def _check_type(key, value):
    old = _known[key]
    if old is None or value is None:
        return value
    if isinstance(old, bool) != isinstance(value, bool):
        _fail(f"{key}={value!r}: expected {type(old).__name__}, got {type(value).__name__}")
    if isinstance(old, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(old)):
        _fail(f"{key}={value!r}: expected {type(old).__name__}, got {type(value).__name__}")
    return value


for _arg in sys.argv[1:]:
    if not _arg.startswith("--"):
        try:
            _src = open(_arg).read()
        except OSError as _e:
            _fail(f"cannot read config file {_arg}: {_e.strerror}")
        _scope = {}
        exec(_src, {}, _scope)
        for _k, _v in _scope.items():
            if _k.startswith("_") or callable(_v) or type(_v).__name__ == "module":
                continue
            _check_key(_k)
            globals()[_k] = _check_type(_k, _v)
    else:
        if "=" not in _arg:
            _fail(f"flag {_arg} needs a value: --key=value")
        _k, _v = _arg[2:].split("=", 1)
        _check_key(_k)
        try:
            _v = ast.literal_eval(_v)
        except (SyntaxError, ValueError):
            pass  # a bare string
        if isinstance(_known[_k], str) and not isinstance(_v, str):
            _v = str(_arg.split("=", 1)[1])  # --out_dir=123 stays a string
        globals()[_k] = _check_type(_k, _v)

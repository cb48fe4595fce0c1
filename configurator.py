"""
Plain-Python configuration, exec'd by train.py, eval.py, bench.py and assets/build_base.py after they define their globals:

    python train.py config/some_overrides.py --batch_size=8 --perturb_at=aligner

A config file is Python that assigns some of the globals. A --key=value flag overrides one global;
its value is parsed as a Python literal when it is one (8, 1e-3, True, 'x') and kept as a string
otherwise. Unknown keys and values of the wrong type are errors, named, at start-up. --help (or -h)
prints the script's usage and every key with its default and its comment, read from the script's
configuration block, and exits.
"""

import ast
import difflib
import io
import sys
import tokenize

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


def _help():
    """The script's docstring, then its configuration block as it reads in the source, with each value as it stands
    before any file or flag: every assignment with its comment, and the comment lines around them. The block is the
    first run of top-level assignments to configuration keys."""
    path = globals().get("__file__") or sys.argv[0]
    src = open(path).read()
    lines, tree = src.splitlines(), ast.parse(src)
    print((ast.get_docstring(tree) or "").strip() + "\n")  # the script's own (exec'ing this file set __doc__ to ours)
    print(f"usage: python {sys.argv[0]} [config/file.py ...] [--key=value ...]; the keys and their defaults:\n")
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    names = lambda target: [e.id for e in target.elts] if isinstance(target, ast.Tuple) else [target.id]
    block = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, (ast.Name, ast.Tuple)) for t in node.targets) \
                and all(n in _known for t in node.targets for n in names(t)):
            block.append(node)
        elif block:
            break
    if not block:  # no such block in the source: the keys alone
        print("\n".join(f"{k} = {v!r}" for k, v in _known.items()))
        return
    first = block[0].lineno
    while first > 1 and lines[first - 2].lstrip().startswith("#") and set(lines[first - 2].strip()) - set("#- "):
        first -= 1  # the block's headings ("# configuration", "# I/O"), not a ruler of dashes
    starts = {node.lineno: node for node in block}
    for i in range(first, block[-1].end_lineno + 1):
        if i in starts:
            node, note = starts[i], comments.get(starts[i].end_lineno)
            values = ", ".join(repr(_known[n]) for n in names(node.targets[-1]))
            print(" = ".join(", ".join(names(t)) for t in node.targets) + " = " + values + (f"  {note}" if note else ""))
        elif lines[i - 1].lstrip().startswith("#"):  # a comment line of its own: a heading, or a comment going on
            print(lines[i - 1].rstrip())


if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
    _help()
    raise SystemExit(0)

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

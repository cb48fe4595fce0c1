"""pytest's settings for test_unigame.py: a deprecation on our code paths fails the tests instead of scrolling by.

A FutureWarning is how transformers and torch announce that an API we call will go (a keyword of
LlamaModel.forward, gradient_checkpointing_enable, ...): it is an error, in the tests and, through
PYTHONWARNINGS, in the train.py, eval.py and bench.py runs they start. So is a DeprecationWarning raised
at a line of our own modules.
"""

import os

OURS = "(bench|buffer|checkpoint|configurator|data|eval|model|perturber|pictures|ranks|train|test_unigame|__main__)$"


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "error::FutureWarning")
    config.addinivalue_line("filterwarnings", f"error::DeprecationWarning:{OURS}")
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), "error::FutureWarning") if w)

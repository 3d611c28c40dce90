"""The tools around the compiler: the command line and what it shows, measures or runs.

The tools may import the compiler (``kvhoist``'s other modules); the compiler never imports a tool
(``tests/test_imports.py`` checks both, lazy imports included). ``import kvhoist`` loads nothing here.

* :mod:`kvhoist.tools.cli`: ``kvhoist`` / ``python -m kvhoist`` (the parser; one module per command in
  :mod:`kvhoist.tools.commands`);
* :mod:`kvhoist.tools.specs`: SPEC resolution (a wan_ref preset or ``module:function``);
* :mod:`kvhoist.tools.diff`, :mod:`kvhoist.tools.graph`: the before/after diff and the dependence graph
  (:mod:`kvhoist.tools.jaxpr_lines` renders and marks the lines, :mod:`kvhoist.tools.diff_summary` counts,
  :mod:`kvhoist.tools.diff_html` writes the page);
* :mod:`kvhoist.tools.tpu`: ``kvhoist compile``'s driver (plain / hand cache / hoisted for a TPU topology);
* :mod:`kvhoist.tools.progress`: the progress line of long commands;
* :mod:`kvhoist.tools.examples`: example programs beyond Wan (an encoder-decoder).

The benchmarks live beside this package, in :mod:`kvhoist.bench`.
"""

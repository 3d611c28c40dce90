"""One module per ``kvhoist`` command; each has ``run(args) -> exit status``.

:mod:`kvhoist.tools.cli` parses the arguments and imports the command's module only when it runs, so
``kvhoist --help`` imports no jax. :mod:`~kvhoist.tools.commands.common` holds what the SPEC commands share.
"""

"""``python -m lctx``: the ``lctx`` command, for environments where the console script is not on PATH."""

from lctx.cli import app

app(prog_name="lctx")

"""``python -m lctx``: the command line, for launchers that start modules (``torchrun -m lctx eval …``)."""

from lctx.cli import app

app(prog_name="lctx")

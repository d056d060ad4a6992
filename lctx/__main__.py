"""``python -m lctx``: the ``lctx`` command, for launchers that start modules (``torchrun -m lctx eval …``)
and environments where the console script is not on PATH."""

from lctx.cli import app

app(prog_name="lctx")

"""Executing a plan, with one writer of the records: in this process (:mod:`lctx.execute.local`), on a Ray cluster's
workers (:mod:`lctx.execute.cluster`, ``--executor ray``), or one shard per process under torchrun / accelerate
launch (:mod:`lctx.execute.launch`); all compute a unit with :func:`lctx.execute.compute.compute`.

``USAGE_ERRORS`` are the errors that mean "the command is wrong" (printed as one line, exit status 2), raised
before any cell is computed; anything else a cell raises is recorded as that cell's error.
"""

from __future__ import annotations

from lctx import data, evals, memory, models, results, spec
from lctx.engine import ChatTemplateError
from lctx.execute.local import EXIT_ERRORS, EXIT_INTERRUPTED, EXIT_OK, RunResult, run
from lctx.patches.arch import UnsupportedModelError
from lctx.plan import PlanError

USAGE_ERRORS = (PlanError, evals.TaskError, spec.SpecError, data.DataError, models.ModelLoadError, memory.SizeError,
                UnsupportedModelError, ChatTemplateError, results.StoreError)

__all__ = ["EXIT_ERRORS", "EXIT_INTERRUPTED", "EXIT_OK", "USAGE_ERRORS", "RunResult", "run"]

"""``lctx analyze``: RoPE arithmetic for a model and target lengths from its config alone (no weights).

Men et al.'s base lower bound, per-dimension wavelengths against the training length, what each ``--rope``
variant does to the frequencies (or, for attention-level variants, to the relative positions), the parameters
that reach a length, and Su's long-term decay; written as ``analysis.json``, ``analysis.md`` and figures.
"""

from lctx.analyze.bound import RATIO, BaseBound, base_bound, su_decay
from lctx.analyze.core import (
    DEFAULT_LENGTHS,
    DEFAULT_ROPES,
    SCHEMA,
    USAGE_ERRORS,
    AnalyzeError,
    Source,
    analyze,
    apply_variant,
    from_options,
    load_source,
    relative_position,
    rope_info_from_config,
    what_if,
)
from lctx.analyze.output import markdown, print_tables, write

__all__ = ["DEFAULT_LENGTHS", "DEFAULT_ROPES", "RATIO", "SCHEMA", "USAGE_ERRORS", "AnalyzeError", "BaseBound",
           "Source", "analyze", "apply_variant", "base_bound", "from_options", "load_source", "markdown",
           "print_tables", "relative_position", "rope_info_from_config", "su_decay", "what_if", "write"]

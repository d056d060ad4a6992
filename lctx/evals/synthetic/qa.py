"""RULER's QA tasks (qa_1: SQuAD, qa_2: HotpotQA): a question answered from its document among distractors.

The data are the files RULER's ``download_qa_dataset.sh`` fetches, in ``data_dir`` (``--data-dir``): SQuAD 2.0's
dev set (``dev-v2.0.json``, RULER's ``squad.json``) and HotpotQA's distractor dev set
(``hotpot_dev_distractor_v1.json``, RULER's ``hotpotqa.json``). Sample i asks the i-th question (answerable
ones, for SQuAD), as RULER does; the documents around it are drawn by the seed. Scored by RULER's
``string_match_part``: a trial scores 1 when any reference answer is in the output.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from lctx.data import DataError
from lctx.engine import Engine
from lctx.evals import CHAT_TEMPLATE, max_new_tokens_param, samples_param
from lctx.evals.synthetic import ruler as generators
from lctx.evals.synthetic import ruler_data
from lctx.evals.synthetic.base import SEED, SyntheticTask, string_match_all, string_match_part
from lctx.spec import Param

FILES = {"squad": ("squad.json", "dev-v2.0.json"), "hotpotqa": ("hotpotqa.json", "hotpot_dev_distractor_v1.json")}
READERS = {"squad": ruler_data.read_squad, "hotpotqa": ruler_data.read_hotpotqa}
SOURCES = {"squad": "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json",
           "hotpotqa": "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json"}


@functools.cache
def _read(dataset: str, path: str, size: int, mtime: int) -> ruler_data.QaData:
    try:
        return READERS[dataset](Path(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not {dataset}'s data as RULER reads it ({type(err).__name__}: {err})") from None


class QuestionAnswering(SyntheticTask):
    """RULER's qa task; the member's dataset is a preset."""

    description = "RULER QA: a question answered from its document among distractor documents"
    params = (samples_param(5, "questions per length (the first N)"), SEED, CHAT_TEMPLATE, max_new_tokens_param(32),
              Param("dataset", str, "squad", "the questions: SQuAD 2.0 dev (RULER qa_1) or HotpotQA dev (qa_2)",
                    choices=tuple(FILES)),
              Param("data_dir", str, None, "directory holding the dataset's file (squad.json or dev-v2.0.json; "
                    "hotpotqa.json or hotpot_dev_distractor_v1.json)", identity=False))
    template = "qa"

    @functools.cached_property
    def file(self) -> Path:
        names = FILES[self.args.dataset]
        if self.args.data_dir is not None:
            for name in names:
                if (Path(self.args.data_dir).expanduser() / name).is_file():
                    return Path(self.args.data_dir).expanduser() / name
        raise DataError(f"{self.name}: no {' or '.join(names)} in --data-dir ({self.args.data_dir}); RULER's "
                        f"{self.args.dataset} questions come from {SOURCES[self.args.dataset]}")

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "data": str(self.file)}

    def validate(self) -> None:
        _ = self.file

    def qa_data(self) -> ruler_data.QaData:
        stat = self.file.stat()
        return _read(self.args.dataset, str(self.file.resolve()), stat.st_size, stat.st_mtime_ns)

    def ruler_samples(self, engine: Engine, cell: generators.Cell) -> list[generators.Sample]:
        return generators.qa(cell, self.qa_data(), self.args.samples)

    def match(self, output: str, answers: list[str]) -> tuple[list[bool], float]:
        return string_match_all(output, answers), string_match_part(output, answers)

    def data_record(self, engine: Engine, cell) -> dict[str, Any]:
        return {**super().data_record(engine, cell), "source": str(self.file), "metric": "string_match_part"}

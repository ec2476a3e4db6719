"""Errors of the pipeline: model directories that cannot be loaded, bad spans."""

from __future__ import annotations

from pathlib import Path

from shoal.errors import Error


class PipelineError(Error):
    """Base class of pipeline errors."""


class ModelLoadError(PipelineError):
    """A model directory cannot be loaded: says what is wrong and what to do about it."""

    def __init__(self, path: Path | str, problem: str, fix: str) -> None:
        super().__init__(f"cannot load model {path}: {problem}; {fix}")
        self.path = Path(path)
        self.problem = problem
        self.fix = fix


class UnsupportedArchitecture(ModelLoadError):
    """config.json names an architecture shoal does not implement."""

    def __init__(self, path: Path | str, architecture: str, supported: tuple[str, ...]) -> None:
        super().__init__(
            path,
            f"unsupported architecture {architecture!r}",
            f"shoal runs {', '.join(supported)}; pick a model of one of those families",
        )
        self.architecture = architecture


class SpanError(PipelineError):
    """A block span is empty, out of range, or asked for a stage it does not hold."""

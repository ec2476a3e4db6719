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


class SwarmError(PipelineError):
    """Base class of the errors of generating through a swarm (routing, servers, limits)."""


class ModelNotFound(SwarmError):
    """No server of the swarm serves the model's first blocks (an unknown name, or a
    swarm whose first-stage servers are all gone)."""

    def __init__(self, model: str, waited: float) -> None:
        super().__init__(
            f"no server in the swarm serves model {model!r} (looked for {waited:.0f}s); "
            "check the name, or start a server: "
            f"`shoal node --model {model} --blocks 0:N --bootstrap ADDR`"
        )
        self.model = model


class NoRoute(SwarmError):
    """Some blocks of the model have no usable server: names them, and the banned peers."""

    def __init__(self, model: str, missing: list[int], banned: list[str], waited: float) -> None:
        ranges = _ranges(missing)
        why = f"; servers banned after failing: {', '.join(banned)}" if banned else ""
        first, last = (missing[0], missing[-1] + 1) if missing else (0, 0)
        super().__init__(
            f"no server of the swarm holds blocks {ranges} of {model} (waited {waited:.0f}s{why}); "
            f"start one with `shoal node --model {model} --blocks {first}:{last} --bootstrap ADDR` "
            "or retry later"
        )
        self.model, self.missing, self.banned = model, missing, banned


class StageFailed(SwarmError):
    """A server of the chain failed (reset, timeout, error reply) and retries ran out."""

    def __init__(self, peer: str, code: str, message: str) -> None:
        super().__init__(f"server {peer} failed: [{code}] {message}")
        self.peer, self.code, self.message = peer, code, message


class ServerRefused(SwarmError):
    """Every server that could take a span refused the session (too many sessions, cache
    full): the swarm is busy; retry later."""

    def __init__(self, peer: str, code: str, message: str) -> None:
        super().__init__(f"server {peer} refused the session: [{code}] {message}; retry later")
        self.peer, self.code, self.message = peer, code, message


class RequestRejected(SwarmError):
    """The request itself is wrong (prompt too long for the context, bad token ids, ...)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _ranges(blocks: list[int]) -> str:
    """[3, 4, 5, 7] -> '3-5, 7'."""
    out: list[str] = []
    for block in blocks:
        if out and block == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{block}"
        else:
            out.append(str(block))
    return ", ".join(out)

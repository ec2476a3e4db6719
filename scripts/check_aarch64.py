"""Which of shoal's dependencies need a source build on a Raspberry Pi (aarch64, CPython 3.11).

Run through scripts/check_aarch64.sh. It asks pip to resolve pyproject.toml's dependencies
(and, separately, the ``test`` extra) for manylinux aarch64 / cp311 with wheels only
(``pip install --dry-run --report``: pip reads each wheel's metadata, downloads no wheel).
When a pinned package has no aarch64 wheel, pip stops with "No matching distribution found
for NAME==VERSION"; pip refuses ``--no-binary`` together with ``--platform``, so the next pass
stands a metadata-only stub wheel in for that package (its sdist's real name, version and
requirements, read by a native ``pip install --dry-run --no-binary NAME``) and resolves again.
Every stubbed package is a source build on the Pi. The list is compared with EXPECTED;
exit 0 when they match, 1 when they differ, 2 when pip failed for another reason.

``--report FILE [--stubbed NAME==VERSION ...]`` skips pip and only parses a saved report
(what the tests run, offline).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Packages that have no aarch64 / cp311 wheel and build from source on the Pi, per set.
#: fastecdsa 2.3.2 is pinned by libp2p 0.8.1 (its aarch64 wheels start at 4.0.0): a C
#: extension, it needs build-essential, python3-dev and libgmp-dev (docs/raspberry-pi.md).
#: varint (multiaddr's) and python-baseconv (py-multibase's) publish sdists only, on every
#: platform; both are pure Python (no compiler).
_SOURCE = frozenset({"fastecdsa==2.3.2", "varint==1.0.2", "python-baseconv==1.2.2"})
EXPECTED: dict[str, frozenset[str]] = {"dependencies": _SOURCE, "test": _SOURCE}

#: What pip on Raspberry Pi OS bookworm (glibc 2.36) accepts: manylinux2014 and
#: manylinux_2_17 .. manylinux_2_36 (nvidia's cu13 wheels are manylinux_2_27), linux_aarch64.
PLATFORMS = (
    "manylinux2014_aarch64",
    *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)),
    "linux_aarch64",
)
#: torch is pinned to the version CI installs. PyPI's aarch64 wheel of it is the CUDA build
#: (407 MiB, and its Requires-Dist pulls nvidia-*-cu13, cuda-* and triton wheels of several
#: GiB): the Pi takes the CPU build (``2.13.0+cpu``, PyTorch's CPU index) instead, whose
#: requirements are these (the CPU wheel's metadata). The check confirms PyPI's aarch64 file
#: by name (no download) and resolves torch as a ``+cpu`` stub with these requirements, so
#: pip neither downloads 400 MiB to read torch's metadata nor follows the CUDA wheels.
TORCH = "2.13.0"
TORCH_LOCAL = "2.13.0+cpu"
TORCH_CPU_REQUIRES = (
    "filelock",
    "typing-extensions>=4.10.0",
    "setuptools>=77.0.3",
    "sympy>=1.13.3",
    "networkx>=2.5.1",
    "jinja2",
    "fsspec>=0.8.5",
)
TARGET = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")
MAX_PASSES = 6
_NO_MATCH = re.compile(
    r"No matching distribution found for ([A-Za-z0-9][A-Za-z0-9._-]*)(?:==([^\s;,]+))?"
)


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Resolved:
    """One package of a resolution: a wheel (its file name) or a source build."""

    name: str
    version: str
    wheel: str | None  # None: no aarch64 wheel, built from the sdist on the Pi

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


def requirements(pyproject: Path, extra: str | None = None) -> list[str]:
    """The dependency list of pyproject.toml, or one of its optional extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    if extra is None:
        return list(project["dependencies"])
    return list(project["optional-dependencies"][extra])


def sdist_only(pip_output: str) -> list[tuple[str, str | None]]:
    """(name, pinned version or None) of each requirement pip found no wheel for."""
    found = [(canonical(n), v or None) for n, v in _NO_MATCH.findall(pip_output)]
    return list(dict.fromkeys(found))


def parse_report(
    report: Mapping[str, Any],
    stubbed: Iterable[str],
    prebuilt: Mapping[str, str] | None = None,
) -> list[Resolved]:
    """The packages of a ``pip install --report`` file. ``stubbed`` (names) and anything not
    fetched as a wheel are source builds, except ``prebuilt`` (name -> the wheel on the index
    that the stub stood in for)."""
    stubs = {canonical(n) for n in stubbed}
    wheels = {canonical(n): w for n, w in (prebuilt or {}).items()}
    out = []
    for item in report["install"]:
        meta = item["metadata"]
        name = canonical(meta["name"])
        filename = item["download_info"]["url"].rsplit("/", 1)[-1]
        wheel: str | None = filename if filename.endswith(".whl") else None
        if name in wheels:
            wheel = wheels[name]
        elif name in stubs:
            wheel = None
        out.append(Resolved(name, meta["version"], wheel))
    return sorted(out, key=lambda r: r.name)


def pin(reqs: Iterable[str], name: str, version: str) -> list[str]:
    """``reqs`` with the requirement on ``name`` replaced by ``name==version``."""
    head = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
    out = []
    for req in reqs:
        match = head.match(req)
        out.append(f"{name}=={version}" if match and canonical(match[1]) == name else req)
    return out


def pick_wheel(files: Iterable[Mapping[str, Any]], name: str, version: str) -> str | None:
    """The file name of ``name==version``'s cp311 aarch64 wheel in a PEP 691 file list."""
    prefix = f"{name}-{version}-cp311-cp311-"
    for file in files:
        filename = str(file["filename"])
        if not (filename.startswith(prefix) and filename.endswith(".whl")):
            continue
        tags = filename[len(prefix) : -len(".whl")].split(".")
        if any(tag in PLATFORMS for tag in tags):
            return filename
    return None


def source_builds(resolved: Iterable[Resolved]) -> frozenset[str]:
    return frozenset(r.pin for r in resolved if r.wheel is None)


def compare(found: frozenset[str], expected: frozenset[str]) -> tuple[bool, str]:
    """Whether the source-build list is the expected one, and a line saying so."""
    if found == expected:
        return True, f"OK: source builds are exactly the expected {sorted(expected) or 'none'}"
    lines = ["MISMATCH: update EXPECTED in scripts/check_aarch64.py and docs/raspberry-pi.md"]
    if found - expected:
        lines.append(f"  needs a source build but not expected: {sorted(found - expected)}")
    if expected - found:
        lines.append(f"  expected a source build but has a wheel now: {sorted(expected - found)}")
    return False, "\n".join(lines)


def render(label: str, resolved: Sequence[Resolved]) -> str:
    width = max((len(r.pin) for r in resolved), default=0)
    rows = [f"== {label}: {len(resolved)} packages for linux aarch64, cp311"]
    for r in resolved:
        rows.append(f"  {r.pin:<{width}}  {r.wheel or 'SOURCE BUILD (no aarch64 wheel)'}")
    return "\n".join(rows)


# -- the network part: pip ------------------------------------------------------------------


def _pip_env() -> dict[str, str]:
    """PyPI as the Pi sees it: no local config files, find-links or extra indexes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q"]
    return subprocess.run([*cmd, *args], env=_pip_env(), capture_output=True, text=True)


class PipFailed(Exception):
    """pip failed for a reason other than a missing aarch64 wheel (exit 2)."""


def index_files(index: str, name: str) -> list[dict[str, Any]]:
    """The files of ``name`` on a PEP 691 (JSON simple API) index: names only, no download."""
    request = urllib.request.Request(
        f"{index.rstrip('/')}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files: list[dict[str, Any]] = json.load(response)["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise PipFailed(f"cannot list {name} on {index}: {exc}") from exc
    return files


def sdist_metadata(name: str, version: str | None, index: str, work: Path) -> dict[str, Any]:
    """The metadata of ``name``'s sdist (that version, else the newest), which pip builds
    here; requirements do not depend on the machine for the packages this is used for."""
    report = work / f"sdist-{name}.json"
    req = f"{name}=={version}" if version else name
    args = ["--index-url", index, "--no-deps", "--no-binary", name, "--report", str(report)]
    done = _pip([*args, req])
    if done.returncode != 0:
        raise PipFailed(f"no aarch64 wheel and no sdist for {req}:\n{done.stderr}")
    meta: dict[str, Any] = json.loads(report.read_text())["install"][0]["metadata"]
    return meta


def write_stub(meta: Mapping[str, Any], directory: Path) -> Path:
    """A py3-none-any wheel with the package's name, version and requirements, no code."""
    name, version = meta["name"], meta["version"]
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    if meta.get("requires_python"):
        lines.append(f"Requires-Python: {meta['requires_python']}")
    lines += [f"Requires-Dist: {req}" for req in meta.get("requires_dist", [])]
    files = {
        f"{dist}.dist-info/METADATA": "\n".join(lines) + "\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: check_aarch64\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def resolve(reqs: Sequence[str], index: str, work: Path) -> tuple[list[Resolved], list[str]]:
    """Resolve ``reqs`` for aarch64 with wheels only, stubbing sdist-only pins pass by pass.
    Returns the packages and a log of what was done."""
    stubs = work / "stubs"
    stubs.mkdir(exist_ok=True)
    torch_wheel = pick_wheel(index_files(index, "torch"), "torch", TORCH)
    if torch_wheel is None:
        raise PipFailed(f"{index} has no cp311 aarch64 wheel of torch {TORCH}")
    meta = {"name": "torch", "version": TORCH_LOCAL, "requires_python": ">=3.10"}
    write_stub(meta | {"requires_dist": list(TORCH_CPU_REQUIRES)}, stubs)
    log = [
        f"torch: the index has {torch_wheel} (the CUDA build); resolving with {TORCH_LOCAL}'s "
        "requirements (the CPU build the Pi installs)"
    ]
    reqs = pin(reqs, "torch", TORCH_LOCAL)
    stubbed: list[str] = []
    platform = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for attempt in range(1, MAX_PASSES + 1):
        report = work / "report.json"
        args = ["--index-url", index, "--find-links", str(stubs), "--only-binary=:all:"]
        args += [*platform, *TARGET, "--target", str(work / "target"), "--report", str(report)]
        done = _pip([*args, *reqs])
        if done.returncode == 0:
            log.append(f"pass {attempt}: resolved")
            found = json.loads(report.read_text())
            cpu_wheel = f"CPU build (PyPI has {torch_wheel}, the CUDA build)"
            return parse_report(found, stubbed, {"torch": cpu_wheel}), log
        missing = [(n, v) for n, v in sdist_only(done.stderr) if n not in stubbed]
        if not missing:
            raise PipFailed(f"pip failed on pass {attempt}:\n{done.stderr[-4000:]}")
        for name, version in missing:
            meta = sdist_metadata(name, version, index, work)
            write_stub(meta, stubs)
            stubbed.append(name)
            log.append(
                f"pass {attempt}: no aarch64 wheel of {name} {version or '(any version)'}; "
                f"its sdist {meta['version']} stands in"
            )
    raise PipFailed(f"still unresolved after {MAX_PASSES} passes: {stubbed}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pyproject", type=Path, default=Path(__file__).parent.parent / "pyproject.toml"
    )
    parser.add_argument("--index-url", default="https://pypi.org/simple")
    parser.add_argument("--no-test-extra", action="store_true", help="the dependencies only")
    parser.add_argument("--report", type=Path, help="parse this saved pip report, no pip run")
    parser.add_argument("--stubbed", nargs="*", default=[], help="with --report: NAME==VERSION")
    parser.add_argument("--set", default="dependencies", choices=sorted(EXPECTED))
    args = parser.parse_args(argv)

    if args.report is not None:
        stubbed = [s.split("==")[0] for s in args.stubbed]
        resolved = parse_report(json.loads(args.report.read_text()), stubbed)
        print(render(f"{args.set} (from {args.report})", resolved))
        ok, line = compare(source_builds(resolved), EXPECTED[args.set])
        print(line)
        return 0 if ok else 1

    sets = {"dependencies": requirements(args.pyproject)}
    if not args.no_test_extra:
        # the test extra on top of the dependencies, as `pip install -e .[test]` installs it
        sets["test"] = sets["dependencies"] + requirements(args.pyproject, "test")
    all_ok = True
    for label, reqs in sets.items():
        try:
            with tempfile.TemporaryDirectory(prefix="shoal-aarch64-") as tmp:
                resolved, log = resolve(reqs, args.index_url, Path(tmp))
        except PipFailed as exc:
            print(f"check_aarch64: {exc}", file=sys.stderr)
            return 2
        print("\n".join(log))
        print(render(label, resolved))
        ok, line = compare(source_builds(resolved), EXPECTED[label])
        print(line, flush=True)
        all_ok = all_ok and ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

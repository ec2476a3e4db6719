"""scripts/check_aarch64.sh's parsing and comparison, offline: a fake pip report, no pip run.

The real resolution (network, minutes) is run by hand: scripts/check_aarch64.sh."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent.parent / "scripts"
_spec = importlib.util.spec_from_file_location("check_aarch64", SCRIPTS / "check_aarch64.py")
assert _spec is not None and _spec.loader is not None
check = importlib.util.module_from_spec(_spec)
sys.modules["check_aarch64"] = check
_spec.loader.exec_module(check)


def _item(name: str, version: str, url: str) -> dict:
    return {"metadata": {"name": name, "version": version}, "download_info": {"url": url}}


def _report(*, baseconv_wheel: bool = False) -> dict:
    pypi = "https://files.example/packages"
    stubs = "file:///tmp/x/stubs"
    baseconv = (
        f"{pypi}/python_baseconv-1.2.2-py3-none-any.whl"
        if baseconv_wheel
        else f"{stubs}/python_baseconv-1.2.2-py3-none-any.whl"
    )
    return {
        "install": [
            _item("trio", "0.35.0", f"{pypi}/trio-0.35.0-py3-none-any.whl"),
            _item("fastecdsa", "2.3.2", f"{stubs}/fastecdsa-2.3.2-py3-none-any.whl"),
            _item("Varint", "1.0.2", f"{stubs}/varint-1.0.2-py3-none-any.whl"),
            _item("python_baseconv", "1.2.2", baseconv),
            _item(
                "pycrdt", "0.14.13", f"{pypi}/pycrdt-0.14.13-cp311-abi3-manylinux_2_17_aarch64.whl"
            ),
        ]
    }


PIP_ERROR = """\
ERROR: Could not find a version that satisfies the requirement fastecdsa==2.3.2; sys_platform != "win32" (from libp2p) (from versions: 4.0.0)
ERROR: No matching distribution found for fastecdsa==2.3.2; sys_platform != "win32"
ERROR: No matching distribution found for varint
"""


def test_sdist_only_reads_pinned_and_unpinned_names() -> None:
    assert check.sdist_only(PIP_ERROR) == [("fastecdsa", "2.3.2"), ("varint", None)]
    assert check.sdist_only("ERROR: ResolutionImpossible") == []


def test_stubbed_packages_are_source_builds() -> None:
    stubbed = ["fastecdsa", "varint", "python-baseconv"]
    resolved = check.parse_report(_report(), stubbed, {"torch": "cpu"})
    assert [r.name for r in resolved] == [
        "fastecdsa",
        "pycrdt",
        "python-baseconv",
        "trio",
        "varint",
    ]
    assert check.source_builds(resolved) == check.EXPECTED["dependencies"]
    assert {r.name: r.wheel for r in resolved}["pycrdt"].endswith("manylinux_2_17_aarch64.whl")
    ok, line = check.compare(check.source_builds(resolved), check.EXPECTED["dependencies"])
    assert ok and line.startswith("OK")


def test_a_changed_list_is_reported_both_ways() -> None:
    resolved = check.parse_report(_report(baseconv_wheel=True), ["fastecdsa", "varint"])
    found = check.source_builds(resolved) | {"newpkg==1.0"}
    ok, message = check.compare(found, check.EXPECTED["dependencies"])
    assert not ok
    assert "not expected: ['newpkg==1.0']" in message
    assert "has a wheel now: ['python-baseconv==1.2.2']" in message


def test_pin_and_pick_wheel() -> None:
    reqs = ["libp2p==0.8.1", "torch>=2.4", "trio>=0.30"]
    assert check.pin(reqs, "torch", "2.13.0+cpu") == [
        "libp2p==0.8.1",
        "torch==2.13.0+cpu",
        "trio>=0.30",
    ]
    files = [
        {"filename": "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"},
        {"filename": "torch-2.13.0-cp312-cp312-manylinux_2_28_aarch64.whl"},
        {"filename": "torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl"},
    ]
    assert check.pick_wheel(files, "torch", "2.13.0") == files[2]["filename"]
    assert check.pick_wheel(files[:2], "torch", "2.13.0") is None


def test_requirements_come_from_pyproject() -> None:
    pyproject = SCRIPTS.parent / "pyproject.toml"
    deps = check.requirements(pyproject)
    assert "libp2p==0.8.1" in deps
    assert any(r.startswith("torch") for r in deps)
    assert any(r.startswith("pytest") for r in check.requirements(pyproject, "test"))


def test_shell_script_offline_exit_codes(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_report()))
    bad.write_text(json.dumps(_report(baseconv_wheel=True)))
    script = str(SCRIPTS / "check_aarch64.sh")
    stubbed = ["--stubbed", "fastecdsa==2.3.2", "varint==1.0.2", "python-baseconv==1.2.2"]
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    done = subprocess.run(
        [script, "--report", str(good), *stubbed], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fastecdsa==2.3.2" in done.stdout and "SOURCE BUILD" in done.stdout
    done = subprocess.run(
        [script, "--report", str(bad), *stubbed[:3]], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1
    assert "MISMATCH" in done.stdout

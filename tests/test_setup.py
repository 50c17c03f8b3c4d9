"""The set-up promises: the lock, the two make targets, CI, and Binder files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "binder" / "requirements.txt"


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"binder/requirements.txt line {line!r} is not an exact '==' pin"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_lock_pins_the_cpu_torch_triton_and_numpy():
    pins = lock_pins()
    assert pins["torch"] == "2.13.0", "torch must be pinned to 2.13.0 (the CPU build here; unpinned pulls CUDA)"
    assert "triton" in pins and "numpy" in pins, "triton needs numpy, which it does not declare"


def test_every_runtime_dependency_has_a_lower_bound_and_is_in_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    pins = lock_pins()
    # the `bench` extra (transformers, a peer library for bench/moe_cpu.py) and the `browser` extra (Playwright, for
    # tests/test_browser.py; pinned in tests/browser/requirements.txt) stay out of the lab environment's lock
    extras = [
        d
        for name, group in project["optional-dependencies"].items()
        if name not in ("bench", "browser")
        for d in group
        if not d.startswith("lablib")
    ]
    for dep in project["dependencies"] + extras:
        name = re.split(r"[<>=!~\[ ]", dep, maxsplit=1)[0].lower().replace("_", "-")
        assert ">=" in dep, f"pyproject dependency {dep!r} needs a lower bound"
        assert name in pins, f"{name} is a dependency but missing from binder/requirements.txt"


def test_installed_versions_match_the_lock():
    """The environment the tests run in is the lock (catches a lock that was edited but never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    wrong = []
    for name, pinned in lock_pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            wrong.append(f"{name} not installed")
            continue
        if installed.split("+")[0] != pinned:
            wrong.append(f"{name} {installed} != {pinned}")
    assert not wrong, f"environment differs from binder/requirements.txt: {wrong}; run `make test` to reinstall"


def test_browser_extra_is_pinned_outside_the_binder_lock():
    """Playwright is a test tool: pinned for `make test` in tests/browser/requirements.txt, agreeing with the lock
    on anything both name, and absent from the Binder image."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["browser"]
    browser_pins = {}
    for line in (ROOT / "tests" / "browser" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"tests/browser/requirements.txt line {line!r} is not an exact '==' pin"
            browser_pins[name.lower().replace("_", "-")] = version
    lock = lock_pins()
    for dep in extra:
        name = re.split(r"[<>=!~\[ ]", dep, maxsplit=1)[0].lower().replace("_", "-")
        assert ">=" in dep and name in browser_pins, f"browser extra {dep!r} needs a lower bound and a pin"
        assert name not in lock, f"{name} is a browser-test tool; keep it out of binder/requirements.txt"
    clashes = {n: (v, lock[n]) for n, v in browser_pins.items() if n in lock and lock[n] != v}
    assert not clashes, f"tests/browser/requirements.txt disagrees with binder/requirements.txt: {clashes}"


def test_ci_runs_make_test_and_nothing_a_user_would_not():
    commands = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert "make test" in commands
    # Chromium from Debian's packages before `make test`, and a missing browser fails CI instead of skipping
    install = next(i for i, c in enumerate(commands) if "apt-get install" in c and "chromium" in c)
    assert install < commands.index("make test")
    assert "export LABLIB_REQUIRE_BROWSER=1" in commands


def test_make_test_runs_the_browser_test_after_nbval_or_says_it_is_skipped():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    assert "--ignore=tests/test_browser.py" in recipe and recipe.rstrip().endswith("browser-test"), recipe
    browser = makefile.split("\nbrowser-test: ", 1)[1].split("\n\n", 1)[0]
    assert "SKIPPED: browser test" in browser and "pytest tests/test_browser.py" in browser, browser


def test_readme_quick_start_has_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [ln.split("#")[0].strip() for ln in block.splitlines()[1:] if ln.strip()]
    assert commands == ["make lab", "make test"]


def test_binder_files_make_py_labs_open_as_notebooks():
    import json

    overrides = json.loads((ROOT / "binder" / "overrides.json").read_text())
    viewers = overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers["python"] == "Jupytext Notebook"
    post = (ROOT / "binder" / "postBuild").read_text()
    assert "overrides.json" in post and "pip install" in post


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_does_not_reinstall_a_ready_venv():
    stamp = Path(sys.prefix) / ".lablib-installed"
    if not stamp.exists():
        pytest.skip("not running inside the Makefile's .venv")
    venv = Path(sys.prefix).relative_to(ROOT) if Path(sys.prefix).is_relative_to(ROOT) else Path(sys.prefix)
    # `make -q` exits 0 when the target is up to date, i.e. `make test` would install nothing
    done = subprocess.run(["make", "-q", f"VENV={venv}", f"{venv}/.lablib-installed"], cwd=ROOT)
    assert done.returncode == 0, "the install stamp is out of date: `make test` would reinstall"


def test_jupytext_pairs_labs_as_ipynb_and_percent_scripts():
    config = tomllib.loads((ROOT / "labs" / "jupytext.toml").read_text())
    assert config["formats"] == "ipynb,py:percent"

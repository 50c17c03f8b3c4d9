"""The labs in a real browser: JupyterLab started the way `make lab` starts it, driven by Playwright on Chromium.

For every lab found as `labs/NN_topic.ipynb` (or a `labs/NN_topic.py` that has no notebook yet) the test opens the
notebook in JupyterLab, clears its stored outputs, runs all cells with a live kernel (no `LABLIB_STATIC`: panels are
real widgets) and checks, cell by cell:

* no cell shows an error or anything on stderr, and every code cell ran;
* every ipywidgets output rendered (no "Loading widget..." or "Error displaying widget"), and every control a panel
  has (the names the committed static run printed in "static view at name=value, ...") is on screen;
* every plotly figure has a plot area with data (or, with no traces at all, shows a note such as "not yet
  measured"), and each cell shows as many figures as the committed run stored;
* moving one slider (dragged with the mouse) changes the figure of the panel it belongs to, without an error.

A screenshot per lab goes to `build/browser-test/` (or `$LABLIB_BROWSER_OUT`), with the server log and the timings.
`labs/NN_topic.py` must open as a notebook (jupytext is the default viewer, from binder/overrides.json), and a
deliberately broken lab (tests/browser/broken_lab.py) must make the same check fail naming its cell.
Cells are numbered from 0 over all cells, as nbval numbers them ("cell 12").

The server is `python -m jupyter lab --ServerApp.root_dir=<labs>` with the environment's settings (so the
jupytext default viewer comes from the installed overrides.json, as in `make lab`), on a free loopback port, with a
token. It serves a copy of `labs/`, so nothing the browser does (autosave) can touch the committed notebooks, and it is
stopped by its PID in every outcome.

Needs Playwright (`pip install -r tests/browser/requirements.txt`, pinned, not in the Binder lock) and a Chromium
executable from the OS (Debian: `apt-get install chromium`; `$CHROMIUM` points at another one). Playwright's own
browser download is never used. Without them the tests skip, saying why; `LABLIB_REQUIRE_BROWSER=1` (set by .ci/run)
turns the skip into a failure. `make test` runs this file after nbval, so lablib's checkpoint cache is warm.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LABS = ROOT / "labs"
FIXTURES = Path(__file__).resolve().parent / "browser"
OUT = Path(os.environ.get("LABLIB_BROWSER_OUT") or ROOT / "build" / "browser-test")
TRUE_WORDS = {"1", "true", "yes", "on"}
REQUIRED = os.environ.get("LABLIB_REQUIRE_BROWSER", "").strip().lower() in TRUE_WORDS
# seconds for one lab's "run all cells" (cold cache, busy machine); warm runs take a few seconds each
RUN_TIMEOUT_S = float(os.environ.get("LABLIB_BROWSER_TIMEOUT", "300"))
# seconds for a moved slider to redraw its figure (the labs promise ~2 s on an idle machine)
REDRAW_TIMEOUT_S = 60.0
STDERR_MIME = "application/vnd.jupyter.stderr"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
STATIC_VIEW = re.compile(r"static view at (.*?) \(open in JupyterLab")


class LabFailure(AssertionError):
    """A lab misbehaved in the browser; the message lists every problem, each naming its cell."""


def discover_labs(folder: Path = LABS) -> list[Path]:
    """`NN_topic.ipynb` for every lab; a `NN_topic.py` without its notebook yet is opened as the notebook."""
    found = {p.stem: p for p in folder.glob("[0-9][0-9]_*.py")}
    found.update({p.stem: p for p in folder.glob("[0-9][0-9]_*.ipynb")})
    return [found[stem] for stem in sorted(found)]


LAB_FILES = discover_labs()
PY_LABS = sorted(LABS.glob("[0-9][0-9]_*.py"))


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (LABLIB_REQUIRE_BROWSER=1, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def find_chromium() -> str | None:
    """$CHROMIUM, else Debian's chromium binary (the real one, not the /usr/bin shell wrapper), else on PATH."""
    candidates = [os.environ.get("CHROMIUM"), "/usr/lib/chromium/chromium"]
    candidates += [shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")]
    for path in candidates:
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return path
    return None


# ---------------------------------------------------------------------------------------------------------------
# The server: started like `make lab`, stopped by PID in every outcome
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabServer:
    url: str
    token: str
    root: Path
    pid: int
    log: Path

    def api(self, path: str, method: str = "GET") -> object:
        request = urllib.request.Request(f"{self.url}{path}", method=method)
        request.add_header("Authorization", f"token {self.token}")
        with urllib.request.urlopen(request, timeout=30) as reply:
            body = reply.read()
        return json.loads(body) if body else None

    def page_url(self, name: str) -> str:
        # ?reset: a fresh workspace, so each page opens only this file (and no kernels of earlier labs)
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"

    def shut_down_kernels(self, name: str) -> None:
        for session in self.api("/api/sessions"):
            if session.get("path") == name:
                self.api(f"/api/sessions/{session['id']}", method="DELETE")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's PID (Jupyter then shuts its kernels down); SIGKILL its process group if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    # start_new_session made the server a group leader: its group id is its PID; kernels left behind go too
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def server_environment(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # the browser is the live frontend: panels must be widgets, progress bars as a learner sees them
    for name in ("LABLIB_STATIC", "LABLIB_PROGRESS", "LABLIB_PLOTLY_RENDERER"):
        env.pop(name, None)
    # no user settings or saved workspaces leak in (the overrides.json installed in the environment still applies)
    env["JUPYTERLAB_SETTINGS_DIR"] = str(home / "user-settings")
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(home / "workspaces")
    env["JUPYTER_RUNTIME_DIR"] = str(home / "runtime")
    return env


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("Playwright is not installed: pip install -r tests/browser/requirements.txt")
    path = find_chromium()
    if path is None:
        _unavailable("no Chromium found: apt-get install chromium (Debian), or set CHROMIUM=/path/to/chromium")
    return path


@pytest.fixture(scope="module")
def lab_server(chromium, tmp_path_factory) -> LabServer:
    home = tmp_path_factory.mktemp("jupyter")
    root = home / "labs"
    shutil.copytree(LABS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "jupyter-server.log"
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
    ]  # fmt: skip
    if os.geteuid() == 0:
        command.append("--allow-root")  # as the Makefile does
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            command, cwd=root, env=server_environment(home), stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = LabServer(url=f"http://127.0.0.1:{port}", token=token, root=root, pid=proc.pid, log=log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode} before serving:\n{server.log_tail()}")
            try:
                server.api("/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer on port {port} within 180 s:\n{server.log_tail()}")
                time.sleep(0.5)
        yield server
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --disable-dev-shm-usage: containers often have a tiny /dev/shm, where Chromium's renderer crashes
        launched = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def timings():
    rows: dict[str, dict] = {}
    yield rows
    if rows:
        OUT.mkdir(parents=True, exist_ok=True)
        record = {"load_average": os.getloadavg(), "labs": rows}
        (OUT / "timings.json").write_text(json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# What the committed (static) run of a lab says the browser should show
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Expected:
    """Per cell: its first source line, whether it is code to run, figures and panel controls to expect."""

    first_lines: list[str]
    runs: list[bool]
    figures: dict[int, int] = field(default_factory=dict)
    controls: dict[int, list[str]] = field(default_factory=dict)


def expected_from(path: Path) -> Expected:
    """Read the notebook (or .py source) the browser will show; outputs stored in it set the expectations."""
    import jupytext

    cells = jupytext.read(path).cells
    expected = Expected(
        first_lines=[next((ln for ln in c.source.splitlines() if ln.strip()), "")[:80] for c in cells],
        runs=[c.cell_type == "code" and bool(c.source.strip()) for c in cells],
    )
    for index, cell in enumerate(cells):
        outputs = cell.get("outputs", []) if cell.cell_type == "code" else []
        figures = sum(PLOTLY_MIME in o.get("data", {}) for o in outputs)
        if figures:
            expected.figures[index] = figures
        text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
        for match in STATIC_VIEW.finditer(text):
            names = re.findall(r"(?:^|, )([A-Za-z_]\w*)=", match.group(1))
            expected.controls.setdefault(index, []).extend(names)
    return expected


# ---------------------------------------------------------------------------------------------------------------
# Driving JupyterLab
# ---------------------------------------------------------------------------------------------------------------

# One pass over the open notebook: per cell its prompt, outputs (mime type, text) and widget/figure state.
INSPECT_JS = r"""
() => {
  const hasData = (trace) => Object.entries(trace).some(([key, value]) =>
      !key.startsWith('_') && value && typeof value !== 'string' && typeof value.length === 'number' &&
      value.length > 0 && ['x', 'y', 'z', 'values', 'r', 'theta', 'labels', 'dimensions', 'lat', 'lon',
                           'a', 'b', 'c', 'open', 'cells', 'node', 'link', 'ids'].includes(key));
  const size = (el) => { const r = el.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)]; };
  const panel = document.querySelector('.jp-NotebookPanel');
  if (!panel) return null;
  const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  const cells = [...panel.querySelectorAll('.jp-Notebook .jp-Cell')].map((cell) => {
    const prompt = cell.querySelector('.jp-InputArea .jp-InputPrompt');
    const outputs = [...cell.querySelectorAll('.jp-OutputArea-output')].map((out) => ({
      mime: out.dataset.mimeType || null,
      text: out.textContent.slice(0, 4000),
      widget: !!out.querySelector('.jupyter-widgets'),
    }));
    const figures = [...cell.querySelectorAll('.js-plotly-plot')].map((gd) => {
      const svg = gd.querySelector('.main-svg');
      const traces = (gd._fullData || []).filter((t) => t.visible !== false);
      const notes = ((gd._fullLayout || {}).annotations || []).filter((a) => a.visible !== false && a.text);
      return {size: svg ? size(svg) : [0, 0], traces: traces.length, withData: traces.filter(hasData).length,
              notes: notes.length};
    });
    const controls = [...cell.querySelectorAll('.jupyter-widgets.widget-inline-hbox')].map((w) => {
      const label = w.querySelector(':scope > .widget-label');
      return {label: label ? label.textContent.trim() : '', size: size(w),
              kind: [...w.classList].filter((c) => c.startsWith('widget-') && c !== 'widget-inline-hbox').join(' ')};
    });
    return {code: cell.classList.contains('jp-CodeCell'), prompt: prompt ? prompt.textContent.trim() : '',
            outputs, figures, controls};
  });
  return {status: indicator ? indicator.dataset.status : null, cells};
}
"""

# A figure's content, to tell whether a slider changed it: its data and layout as plotly.js holds them.
FIGURE_JS = """(gd) => JSON.stringify({data: gd.data, layout: gd.layout}, (key, value) =>
    (ArrayBuffer.isView(value) ? Array.from(value) : value))"""


def menu(page, top: str, item: str) -> None:
    """Click a JupyterLab main-menu entry, e.g. menu(page, "Run", "Run All Cells")."""
    page.locator(".lm-MenuBar-item", has_text=top).first.click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(rf"^{re.escape(item)}$"))
    page.locator(".lm-Menu-item", has=label).first.click()


def accept_kernel_dialog(page) -> bool:
    """Under load JupyterLab can open a notebook before it has the kernel list, and then asks which kernel to use
    (preselecting the notebook's own, python3): accept it as a user would. True if the dialog was there."""
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    if dialog.count() == 0:
        return False
    dialog.locator(".jp-mod-accept").first.click()
    dialog.wait_for(state="detached", timeout=30_000)
    return True


def open_notebook(page, server: LabServer, name: str) -> bool:
    """Open `name`, wait until its kernel is idle; True if the kernel-selection dialog had to be accepted."""
    page.goto(server.page_url(name))
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=120_000)
    # a kernel must be up before "Run All" is worth pressing, and no dialog may cover the menus
    idle = page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status=idle]")
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    idle.or_(dialog).first.wait_for(timeout=120_000)
    time.sleep(1.0)  # the dialog, when it comes, can follow the first idle status
    accepted = accept_kernel_dialog(page)
    idle.wait_for(timeout=120_000)
    return accepted


def run_all(page, expected: Expected, timeout_s: float) -> dict:
    """Clear stored outputs, run all cells; return the notebook state once the kernel is idle and the run ended."""
    menu(page, "Edit", "Clear Outputs of All Cells")
    # stored outputs and execution counts must be gone, or a run that never started would look finished
    deadline = time.monotonic() + 30
    while True:
        cells = page.evaluate(INSPECT_JS)["cells"]
        if all(not c["outputs"] and not re.search(r"\d", c["prompt"]) for c in cells):
            break
        if time.monotonic() > deadline:
            raise LabFailure("Edit > Clear Outputs of All Cells did not clear the stored outputs within 30 s")
        time.sleep(0.5)
    menu(page, "Run", "Run All Cells")
    deadline = time.monotonic() + timeout_s
    while True:
        state = page.evaluate(INSPECT_JS)
        cells = state["cells"]
        running = any("*" in c["prompt"] for c in cells)
        ran = [bool(re.fullmatch(r"\[\d+\]:", c["prompt"])) for c in cells]
        stopped = any(o["mime"] == STDERR_MIME and "Traceback" in o["text"] for c in cells for o in c["outputs"])
        finished = all(r for r, should in zip(ran, expected.runs) if should)
        if state["status"] == "idle" and not running and (finished or stopped):
            return state
        if time.monotonic() > deadline:
            state["timed_out"] = True
            return state
        time.sleep(1.0)


def describe(expected: Expected, index: int) -> str:
    line = expected.first_lines[index] if index < len(expected.first_lines) else ""
    return f"cell {index} ({line!r})"


def error_text(text: str) -> str:
    """The last line of a traceback ("RuntimeError: ..."), or the first stderr line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    if "Traceback" in text:
        named = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln)]
        return (named or lines or ["(empty traceback)"])[-1][:300]
    return (lines or [""])[0][:300]


def run_problems(state: dict, expected: Expected) -> list[str]:
    """What went wrong in running the cells: errors, stderr, static mode, cells that never ran. Final once the
    run has ended (waiting longer does not change them)."""
    cells = state["cells"]
    if len(cells) != len(expected.runs):
        return [f"JupyterLab shows {len(cells)} cells, the file has {len(expected.runs)}"]
    problems = []
    if state.get("timed_out"):
        busy = [i for i, c in enumerate(cells) if "*" in c["prompt"]]
        where = describe(expected, busy[0]) if busy else "the kernel"
        problems.append(f"run did not finish within {RUN_TIMEOUT_S:.0f} s (still busy: {where})")
    first_error = None
    for index, cell in enumerate(cells):
        for out in cell["outputs"]:
            if out["mime"] == STDERR_MIME:
                kind = "raised" if "Traceback" in out["text"] else "wrote to stderr"
                first_error = index if first_error is None else first_error
                problems.append(f"{describe(expected, index)} {kind}: {error_text(out['text'])}")
            elif "static view at" in out["text"]:
                problems.append(f"{describe(expected, index)} drew a static figure: the kernel ran with LABLIB_STATIC")
    not_run = [i for i, c in enumerate(cells) if expected.runs[i] and not re.fullmatch(r"\[\d+\]:", c["prompt"])]
    if not_run and not state.get("timed_out"):
        after = " after the error" if first_error is not None and not_run[0] > first_error else ""
        problems.append(f"{len(not_run)} code cells did not run{after}, first {describe(expected, not_run[0])}")
    return problems


def render_problems(state: dict, expected: Expected) -> list[str]:
    """What did not render in the cells that ran: widgets, panel controls, plotly figures (may still be pending)."""
    problems = []
    if len(state["cells"]) != len(expected.runs):
        return problems  # run_problems reports it
    for index, cell in enumerate(state["cells"]):
        if not re.fullmatch(r"\[\d+\]:", cell["prompt"]):
            continue
        for out in cell["outputs"]:
            if "Error displaying widget" in out["text"] or "Error rendering" in out["text"]:
                problems.append(f"{describe(expected, index)}: a widget failed to display: {out['text'][:200]!r}")
            elif "Loading widget" in out["text"] and not out["widget"]:
                problems.append(f"{describe(expected, index)}: a widget never rendered (still 'Loading widget...')")
        want = expected.figures.get(index, 0)
        if len(cell["figures"]) < want:
            problems.append(f"{describe(expected, index)} shows {len(cell['figures'])} plotly figures, expected {want}")
        for figure in cell["figures"]:
            width, height = figure["size"]
            # a figure with no traces that shows a note ("not yet measured") is drawn as intended, not broken
            note_only = figure["traces"] == 0 and figure["notes"] > 0
            if width < 50 or height < 50 or (figure["withData"] == 0 and not note_only):
                problems.append(
                    f"{describe(expected, index)}: a plotly figure has no plot area with data "
                    f"(plot {width}x{height} px, {figure['traces']} traces, {figure['withData']} with data)"
                )
        shown = {c["label"] for c in cell["controls"] if c["size"][0] > 0 and c["size"][1] > 0}
        missing = [name for name in expected.controls.get(index, []) if name not in shown]
        if missing:
            problems.append(f"{describe(expected, index)}: panel controls {missing} did not render (shown: {sorted(shown)})")
        for control in cell["controls"]:
            display_only = re.search(r"\bwidget-(html|htmlmath|label)\b", control["kind"])  # an empty status line
            if not display_only and (control["size"][0] == 0 or control["size"][1] == 0):
                problems.append(f"{describe(expected, index)}: control {control['label'] or control['kind']!r} has no size")
    return problems


def inspect_until_rendered(page, state: dict, expected: Expected, timeout_s: float = 60.0) -> list[str]:
    """Figures and widgets render after the kernel answers: re-inspect (scrolling each output into view, since
    JupyterLab skips rendering cells off screen) until nothing is pending, then report what is still wrong.
    Problems of the run itself (an error, a cell that never ran) are final: no waiting then."""
    deadline = time.monotonic() + timeout_s
    while True:
        for output in page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell .jp-OutputArea-output").all():
            output.scroll_into_view_if_needed()
        fresh = page.evaluate(INSPECT_JS)
        fresh["timed_out"] = state.get("timed_out", False)
        final, pending = run_problems(fresh, expected), render_problems(fresh, expected)
        if final or not pending or time.monotonic() > deadline:
            return final + pending
        time.sleep(2.0)


@dataclass
class SliderResult:
    label: str
    before: str
    after: str
    problem: str | None


def move_one_slider(page, redraw_timeout_s: float = REDRAW_TIMEOUT_S) -> SliderResult | None:
    """Drag the first slider that sits in a panel with a figure; wait for that figure to change."""
    sliders = page.locator(".jp-OutputArea-output:has(.js-plotly-plot) .jupyter-widgets.widget-hslider")
    if sliders.count() == 0:
        return None
    slider = sliders.first
    slider.scroll_into_view_if_needed()
    output = slider.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea-output')][1]")
    figure = output.locator(".js-plotly-plot").first
    status = output.locator(".widget-html-content")
    label = slider.evaluate("(el) => (el.querySelector('.widget-label') || {textContent: ''}).textContent.trim()")
    handle, track = slider.locator(".noUi-handle").first, slider.locator(".noUi-base").first
    before_value = handle.get_attribute("aria-valuenow")
    before_figure = figure.evaluate(FIGURE_JS)
    hb, tb = handle.bounding_box(), track.bounding_box()
    x, y = hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2
    position = (x - tb["x"]) / max(tb["width"], 1.0)
    target = tb["x"] + tb["width"] * (position + 0.4 if position < 0.5 else position - 0.4)
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(target, y, steps=12)
    page.mouse.up()
    after_value = handle.get_attribute("aria-valuenow")
    if after_value == before_value:
        return SliderResult(label, before_value, after_value, f"dragging slider {label!r} did not move it")
    deadline = time.monotonic() + redraw_timeout_s
    while True:
        # the panel's status line shows an error raised while redrawing (the last good figure stays)
        message = status.first.inner_text().strip() if status.count() else ""
        if message:
            problem = f"after moving slider {label!r} from {before_value} to {after_value} the panel says: {message}"
            return SliderResult(label, before_value, after_value, problem)
        if figure.evaluate(FIGURE_JS) != before_figure:
            return SliderResult(label, before_value, after_value, None)
        if time.monotonic() > deadline:
            problem = f"moving slider {label!r} from {before_value} to {after_value} did not change its figure"
            return SliderResult(label, before_value, after_value, f"{problem} within {redraw_timeout_s:.0f} s")
        time.sleep(0.5)


def check_lab(page, server: LabServer, path: Path, *, redraw_timeout_s: float = REDRAW_TIMEOUT_S) -> dict:
    """Open `path` (a file in the server's root), run it, check it; raise LabFailure listing every problem."""
    expected = expected_from(path)
    timing = {}
    start = time.monotonic()
    timing["kernel_dialog"] = open_notebook(page, server, path.name)
    timing["open_s"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    state = run_all(page, expected, RUN_TIMEOUT_S)
    timing["run_all_s"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    problems = inspect_until_rendered(page, state, expected)
    timing["checks_s"] = round(time.monotonic() - start, 1)
    slider = None
    if not problems:
        start = time.monotonic()
        slider = move_one_slider(page, redraw_timeout_s)
        timing["slider_s"] = round(time.monotonic() - start, 1)
        if slider is None:
            problems.append("no slider in a panel with a figure: each lab should have one to play with")
        elif slider is not None and slider.problem:
            problems.append(slider.problem)
    else:
        # show the first failing cell in the screenshot
        first = re.search(r"cell (\d+)", problems[0])
        if first:
            page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(int(first.group(1))).scroll_into_view_if_needed()
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / f"{path.stem}.png"))
    if problems:
        raise LabFailure(f"{path.name} in JupyterLab:\n  " + "\n  ".join(problems))
    timing["slider"] = f"{slider.label}: {slider.before} -> {slider.after}" if slider else None
    return timing


# ---------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------


def test_there_are_labs_to_open():
    assert LAB_FILES, f"no labs/NN_topic.ipynb or .py found in {LABS}"


def test_server_applies_the_jupytext_default_viewer(lab_server):
    """The overrides.json that `make lab` / binder/postBuild install reach the server that `make lab` starts."""
    settings = lab_server.api("/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
    viewers = settings["schema"]["properties"]["defaultViewers"]["default"]
    assert viewers.get("python") == "Jupytext Notebook", (
        f"JupyterLab's default viewer for .py is {viewers.get('python')!r}: binder/overrides.json is not installed "
        f"in {sys.prefix}/share/jupyter/lab/settings/ (run `make test` or binder/postBuild)"
    )


@pytest.mark.parametrize("lab", LAB_FILES, ids=lambda p: p.stem)
def test_lab_runs_in_jupyterlab(lab: Path, lab_server, browser, timings):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    start = time.monotonic()
    try:
        timing = check_lab(page, lab_server, lab_server.root / lab.name)
        timing["total_s"] = round(time.monotonic() - start, 1)
        timings[lab.stem] = timing
        print(f"{lab.name}: {timing}")
    finally:
        page.close()
        lab_server.shut_down_kernels(lab.name)


@pytest.mark.parametrize("lab", PY_LABS, ids=lambda p: p.stem)
def test_py_lab_opens_as_a_notebook(lab: Path, lab_server, browser):
    import jupytext

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(lab_server.page_url(lab.name))
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell, .jp-FileEditor", timeout=120_000)
        assert page.locator(".jp-FileEditor").count() == 0, f"{lab.name} opened in the text editor, not as a notebook"
        cells = jupytext.read(lab).cells
        # cells attach progressively: wait for the count to reach the file's, fail with the count shown otherwise
        try:
            page.wait_for_function(
                f"() => document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell').length >= {len(cells)}",
                timeout=60_000,
            )
        except Exception:  # noqa: BLE001 - playwright's TimeoutError; the assertion below says what was shown
            pass
        shown = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").count()
        assert shown == len(cells), f"{lab.name} opens as a notebook of {shown} cells, jupytext reads {len(cells)}"
        title = next(ln for ln in cells[0].source.splitlines() if ln.strip()).lstrip("# ")
        heading = page.locator(".jp-NotebookPanel .jp-MarkdownCell h1").first.inner_text()
        assert title.split(":")[0] in heading, f"{lab.name}: first heading {heading!r}, expected {title!r}"
    finally:
        page.close()
        lab_server.shut_down_kernels(lab.name)


def test_a_broken_lab_fails_naming_its_cell(lab_server, browser):
    """The check can fail: a lab raising in a cell is reported with that cell's number and first line."""
    import jupytext

    broken = lab_server.root / "98_broken_fixture.ipynb"
    jupytext.write(jupytext.read(FIXTURES / "broken_lab.py"), broken)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        with pytest.raises(LabFailure) as failure:
            check_lab(page, lab_server, broken)
    finally:
        page.close()
        lab_server.shut_down_kernels(broken.name)
    message = str(failure.value)
    assert "cell 3 ('def broken_step():') raised: RuntimeError: this lab is broken on purpose" in message, message
    assert "did not run after the error, first cell 5 ('print(\"never reached\")')" in message, message


# ---------------------------------------------------------------------------------------------------------------
# Binder readiness: binder/requirements.txt + binder/postBuild alone run every lab
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LABLIB_BINDER_CHECK", "").strip().lower() not in TRUE_WORDS,
    reason="builds a fresh venv and runs every lab cold (minutes): set LABLIB_BINDER_CHECK=1 or run make binder-check",
)
def test_binder_files_alone_run_every_lab(tmp_path):
    """`make binder-check`: a fresh venv from binder/requirements.txt, then binder/postBuild, then nbval over every
    lab with an empty checkpoint cache, as on a fresh Binder. No browser needed (nor available on Binder)."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    notebooks = sorted(LABS.glob("[0-9][0-9]_*.ipynb"))
    start = time.monotonic()
    done = subprocess.run(
        ["make", "--no-print-directory", "binder-check", f"BINDER_VENV={tmp_path / 'venv'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seconds = time.monotonic() - start
    # pip's notes about unused index locations would bury pytest's report
    output = "\n".join(ln for ln in done.stdout.splitlines() if not ln.startswith("WARNING: Location "))
    (OUT / "binder-check.log").parent.mkdir(parents=True, exist_ok=True)
    (OUT / "binder-check.log").write_text(done.stdout)
    assert done.returncode == 0, f"make binder-check failed after {seconds:.0f} s:\n{output[-6000:]}"
    missing = [nb.name for nb in notebooks if nb.name not in output]
    assert not missing, f"make binder-check did not execute {missing}:\n{output[-3000:]}"
    print(f"binder-check: {len(notebooks)} labs in {seconds:.0f} s, load average {os.getloadavg()}")


def test_a_slider_that_changes_nothing_fails(lab_server, browser):
    """The slider check can fail: a panel whose figure ignores its slider is reported (the figure must change)."""
    import jupytext

    inert = lab_server.root / "97_inert_slider_fixture.ipynb"
    jupytext.write(jupytext.read(FIXTURES / "inert_slider_lab.py"), inert)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        with pytest.raises(LabFailure) as failure:
            check_lab(page, lab_server, inert, redraw_timeout_s=10)
    finally:
        page.close()
        lab_server.shut_down_kernels(inert.name)
    assert "moving slider 'n' from 1" in str(failure.value) and "did not change its figure" in str(failure.value)

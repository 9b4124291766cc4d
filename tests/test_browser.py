"""The schedule panel where instructors use it: JupyterLab in a browser (headless Chromium).

The test starts JupyterLab on 127.0.0.1 (a free port, a random token, a temporary root folder), opens
notebook 04 cut after its panel cell (``tags: schedule-panel``; the training cells that follow are left
out, and ``EPOCHS = (2, 3, 3)`` is injected after the parameters cell as papermill would), runs it with
the menu's Run ▸ Run All Cells, then moves the stage-1 boundary slider with the keyboard and checks that
the preview table follows, clicks stage 1's "find LR" button and checks that the finder's curve appears
and stage 1's learning-rate slider moves to the suggestion, and that moving the boundary past the end of
stage 2 shows the invalid-choice message while the table keeps the last valid schedule. Screenshots go
to ``test-artifacts/``; JupyterLab (and its kernel) is stopped even when the test fails.

Needs Debian's Chromium (``apt-get install chromium``) and Playwright's Python package — never
Playwright's own browser download. Without Chromium the test is skipped with that reason.
"""

from __future__ import annotations

import contextlib
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
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_three_stage_finetuning.ipynb"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EPOCHS = (2, 3, 3)  # stage 1 = 1-2, stage 2 = 3-5, stage 3 = 6-8
FINDER_STEPS = 20  # the "find LR" click's sweep


def chromium_path() -> str | None:
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def panel_notebook(path: Path) -> None:
    """Notebook 04 up to and including its panel cell, outputs and stored widget state removed."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    cells = nb["cells"]
    last = next(i for i, c in enumerate(cells) if "schedule-panel" in c.get("metadata", {}).get("tags", []))
    params = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    injected = {
        "id": "injected-parameters",
        "cell_type": "code",
        "execution_count": None,
        "metadata": {"tags": ["injected-parameters"]},
        "outputs": [],
        "source": f'PRESET = "smoke"\nEPOCHS = {EPOCHS}\n',
    }
    finder = {
        "id": "injected-finder",
        "cell_type": "code",
        "execution_count": None,
        "metadata": {},
        "outputs": [],
        "source": f"panel.finder_kwargs = {{'num_steps': {FINDER_STEPS}}}  # a short sweep for the test\n",
    }
    cells = cells[: params + 1] + [injected] + cells[params + 1 : last + 1] + [finder]
    for c in cells:
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
    nb["cells"] = cells
    nb["metadata"].pop("widgets", None)
    path.write_text(json.dumps(nb, ensure_ascii=False, indent=1), encoding="utf-8")


def run_all_cells(page, expect) -> None:
    """Run ▸ Run All Cells once the kernel is idle; once more if no cell started (a click too early)."""
    kernel_idle = page.get_by_role("button", name=re.compile(r"Python 3.*\|\s*Idle"))
    expect(kernel_idle).to_be_visible(timeout=120_000)
    started = page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]")).first
    for _attempt in range(3):
        select = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
        if select.count():  # a kernel dialog despite autoStartDefaultKernel: take the preferred kernel
            select.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
        try:
            expect(started).to_be_visible(timeout=15_000)
            return
        except AssertionError:
            page.keyboard.press("Escape")  # close the menu if it is still open, then try again
    raise AssertionError("Run ▸ Run All Cells did not start any cell")


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def chromium():
    """Debian's Chromium and Playwright's Python package, or a skip that says what to install."""
    path = chromium_path()
    if path is None:
        pytest.skip("Debian's Chromium is not installed: apt-get install chromium")
    pytest.importorskip(
        "playwright.sync_api",
        reason="Playwright is not installed: pip install playwright (its own browser download is not needed)",
    )
    return path


def lab_environment(home: Path) -> dict:
    """An isolated JupyterLab config under ``home``: start the notebook's kernel without asking, keep every
    cell in the DOM (no windowing), and no news/update pop-ups over the notebook."""
    settings = home / "settings"
    _write_json(
        settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
        {"windowingMode": "none", "autoStartDefaultKernel": True},
    )
    _write_json(
        settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
        {"fetchNews": "false", "checkForUpdates": False},
    )
    return dict(
        os.environ,
        COURSE_PRESET="smoke",
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        IPYTHONDIR=str(home / "ipython"),
        PYTHONUNBUFFERED="1",
    )


def lab_command(port: int, token: str, root: Path) -> list[str]:
    cmd = [
        str(Path(sys.executable).with_name("jupyter")),
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    return cmd


def wait_for_lab(server: subprocess.Popen, base: str, token: str, timeout: float = 120) -> None:
    """Until the server answers ``/api/status``; ``RuntimeError`` if it exits or takes over ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(
                f"JupyterLab exited with {server.returncode}; see {ARTIFACTS / 'browser_jupyterlab.log'}"
            )
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"JupyterLab did not answer /api/status within {timeout:.0f} s")
        time.sleep(0.5)


def stop_lab(server: subprocess.Popen) -> None:
    """Stop the server and every process it started (kernels run in their own sessions)."""
    import psutil

    try:
        children = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@pytest.fixture
def jupyterlab(chromium, tmp_path):
    """A JupyterLab server on a free port with a random token, in an isolated config; stopped afterwards."""
    root, home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    panel_notebook(root / "04_panel.ipynb")
    env = lab_environment(home)
    port, token = free_port(), secrets.token_hex(16)
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "browser_jupyterlab.log", "w") as log:
        server = subprocess.Popen(
            lab_command(port, token, root),
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_lab(server, base, token)
            yield {"base": base, "token": token, "notebook": "04_panel.ipynb", "server": server}
        finally:
            stop_lab(server)


# ------------------------------------------------------------------------------ the steps of the test
def move_end1(page, expect, to: int) -> None:
    """One key press on the stage-1 boundary slider (one at a time: the widget manager may merge quick
    successive changes), then wait for its readout."""
    page.locator(".schedule-end1 .noUi-handle").press("ArrowRight")
    expect(page.locator(".schedule-end1 .widget-readout")).to_have_text(str(to))


def check_first_move(page, expect) -> tuple[str, str]:
    """The panel is drawn; moving the end of stage 1 with the keyboard (2 → 3) redraws the table.
    Returns the table's text before and after."""
    table = page.locator(".schedule-preview-table")
    expect(page.locator(".schedule-designer .widget-slider").first).to_be_visible(timeout=240_000)
    expect(table).to_contain_text("1-2", timeout=60_000)
    expect(table).to_contain_text("3-5")
    expect(page.locator(".schedule-preview-plot")).to_be_visible()
    expect(page.locator(".schedule-error")).to_have_text("")
    before = table.inner_text()
    page.locator(".schedule-end1 .noUi-handle").focus()
    move_end1(page, expect, 3)
    expect(table).to_contain_text("1-3", timeout=60_000)
    expect(table).to_contain_text("4-5")
    moved = table.inner_text()
    assert moved != before and "1-2" not in moved
    return before, moved


def check_find_lr(page, expect) -> tuple[str, str]:
    """Stage 1's "find LR": the curve appears and stage 1's lr slider moves to the suggestion, which the
    preview table shows too. Returns the slider's readout before and the suggestion."""
    lr_readout = page.locator(".schedule-lr-1 .widget-readout")
    lr_before = lr_readout.inner_text()
    expect(page.locator(".schedule-lr-curve")).to_be_hidden()
    page.locator("button.schedule-find-lr-1").click()
    status = page.locator(".schedule-find-lr-status")
    expect(status).to_contain_text("suggestion", timeout=180_000)
    expect(page.locator(".schedule-lr-curve")).to_be_visible()
    suggestion = re.search(r"\(suggestion\) (\S+)（valley", status.inner_text()).group(1)  # Python's .1e
    mantissa, exponent = suggestion.split("e")
    expect(lr_readout).to_have_text(f"{mantissa}e{int(exponent)}", timeout=30_000)  # the slider's d3 .1e
    expect(page.locator(".schedule-preview-table")).to_contain_text(suggestion, timeout=30_000)
    return lr_before, suggestion


def check_invalid_moves(page, expect) -> str:
    """3 → 4 is still valid; 4 → 5 leaves stage 2 empty and 5 → 6 ends it before stage 1: the message
    shows, Train is disabled and the table keeps the last valid schedule. Returns the message."""
    table, error = page.locator(".schedule-preview-table"), page.locator(".schedule-error")
    move_end1(page, expect, 4)
    expect(table).to_contain_text("1-4", timeout=60_000)
    expect(table).to_contain_text("5-5")
    move_end1(page, expect, 5)
    expect(error).to_contain_text("invalid choice", timeout=60_000)
    expect(error).to_contain_text("阶段 2 是空的")
    move_end1(page, expect, 6)
    expect(error).to_contain_text("阶段 2 会在阶段 1 之前结束", timeout=60_000)
    expect(page.locator("button.schedule-train")).to_be_disabled()
    kept = table.inner_text()
    assert "1-4" in kept and "5-5" in kept, kept  # the preview keeps the last valid schedule
    return error.inner_text()


def test_panel_in_jupyterlab(chromium, jupyterlab, tmp_path):
    from playwright import sync_api

    expect = sync_api.expect
    shots = []
    (ARTIFACTS / "browser_failure.png").unlink(missing_ok=True)  # only a failure of this run leaves one

    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1600},
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(60_000)
        panel = page.locator(".schedule-designer")

        def shot(name, target=None):
            path = ARTIFACTS / name
            (target or page).screenshot(path=str(path))
            shots.append(path)

        try:
            page.goto(f"{jupyterlab['base']}/lab/tree/{jupyterlab['notebook']}?token={jupyterlab['token']}")
            expect(page.locator(".jp-Notebook .jp-Cell").first).to_be_visible(timeout=120_000)
            run_all_cells(page, expect)
            before, moved = check_first_move(page, expect)
            shot("browser_panel_moved.png", panel)
            lr_before, suggestion = check_find_lr(page, expect)
            shot("browser_panel_find_lr.png", panel)
            message = check_invalid_moves(page, expect)
            shot("browser_panel.png", panel)
            shot("browser_page.png")
            assert page.locator(".jp-OutputArea-output", has_text="Traceback").count() == 0
            print(
                f"\nmoved the stage-1 end 2→3: preview table {before!r} → {moved!r}\n"
                f"find LR (stage 1): slider {lr_before} → {suggestion}\n"
                f"moved it 3→6: message {message!r}, table kept\n"
                f"screenshots: {', '.join(str(s) for s in shots)}"
            )
        except BaseException:
            with contextlib.suppress(Exception):
                shot("browser_failure.png")
            raise
        finally:
            context.close()

"""The explorer in a real browser: JupyterLab + headless Chromium (selenium) run notebooks/07_explorer,
move the bits slider and check that the plot changes; the protocol label must sit on its buttons' line.

Needs Debian's `chromium` and `chromium-driver` (`apt-get install -y chromium chromium-driver`) and
`pip install selenium`; skipped with the reason when any is missing. A screenshot goes to the test's
tmp_path and, when $KVLAB_ARTIFACTS is set, to that folder as well.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "07_explorer.ipynb"
CHROMIUM = "/usr/bin/chromium"
PARAMS = dict(model="tiny-llama", n_tokens=128, window=64, calib_tokens=64, bits=4, update_bits=2)


def _chromedriver() -> str | None:
    for p in ("/usr/bin/chromedriver", shutil.which("chromedriver")):
        if p and os.access(p, os.X_OK):
            return p
    return None


def _missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)"
    if _chromedriver() is None:
        return "chromedriver is missing (apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, fn, timeout: float, interval: float = 0.25):
    """Poll `fn` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < end:
        try:
            value = fn()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - page not ready yet, stale element, ...
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_exc})"
                                                                                  if last_exc else ""))


def _parameterized_copy(root: Path, figures: Path) -> Path:
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(NOTEBOOK))
    nb = parameterize_notebook(nb, {**PARAMS, "figures": str(figures)})
    out = root / NOTEBOOK.name
    nbformat.write(nb, str(out))
    return out


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on a random localhost port, no token, a temp root dir holding the parameterized notebook."""
    root = tmp_path / "root"
    root.mkdir()
    nb = _parameterized_copy(root, tmp_path / "figures")
    settings = tmp_path / "jsettings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port = _free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "jsettings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "jworkspaces"), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"jupyterlab exited with {proc.returncode}; see {tmp_path / 'jupyterlab.log'}")
        with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
            return r.status == 200

    try:
        _wait("JupyterLab to answer /api/status", up, timeout=30)
        yield url, nb
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)       # the server shuts its kernels down on SIGTERM
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)    # the process group this fixture started
                proc.wait(timeout=5)
        log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1500,1300"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(_chromedriver(), log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(20)
    try:   # let the page behave as focused in headless mode (what puppeteer does): focus events, keyboard
        driver.execute_cdp_cmd("Emulation.setFocusEmulationEnabled", {"enabled": True})
    except Exception:  # noqa: BLE001 - best effort; the test does not depend on focus tracking
        pass
    try:
        yield driver
    finally:
        driver.quit()


# The notebook's panel, found among the main-area widgets by its path (arguments[0], without a drive). Not
# `app.shell.currentWidget`: that follows DOM focus events, which headless chromium (150 at least) does not
# deliver to an unfocused window, so it can stay null although the notebook is open.
_NOTEBOOK_STATE = """
const app = window.jupyterapp;
if (!app || !app.shell || typeof app.shell.widgets !== 'function') return null;
const w = Array.from(app.shell.widgets('main')).find(
    w => w && w.context && (w.context.localPath || w.context.path) === arguments[0] && w.content
         && w.content.widgets && w.sessionContext);
if (!w || !w.context.isReady || !w.sessionContext.session) return null;
const k = w.sessionContext.session.kernel;
const cells = w.content.widgets.filter(c => c.model.type === 'code');
return {id: w.id, kernel: k ? k.status : null, executed: cells.filter(c => c.model.executionCount).length,
        cells: cells.length, errors: cells.filter(c => c.model.outputs && JSON.stringify(c.model.outputs.toJSON())
                                                     .includes('"output_type":"error"')).length};
"""


def _artifact(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    dest = os.environ.get("KVLAB_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(dest) / name)


@pytest.mark.timeout(150)
def test_explorer_slider_updates_the_plot_in_jupyterlab(jupyterlab, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    t0 = time.monotonic()
    url, nb = jupyterlab
    browser.get(f"{url}/lab/tree/{nb.name}")

    path = nb.name                      # the path JupyterLab knows it by: relative to root_dir, which holds it
    state = lambda: browser.execute_script(_NOTEBOOK_STATE, path)  # noqa: E731

    def kernel_idle():
        s = state()
        return s if s and s["kernel"] == "idle" else None

    panel = _wait("the notebook to open with an idle kernel", kernel_idle, timeout=60)["id"]
    # Activate the panel by id and name it to the command (`semanticWidget`), so that neither depends on which
    # widget the shell or the notebook tracker believes is current.
    browser.execute_script("const app = window.jupyterapp; app.shell.activateById(arguments[0]);"
                           "app.commands.execute('notebook:run-all-cells', {semanticWidget: arguments[0]});", panel)

    def all_run():
        s = state()
        if s and s["errors"]:
            raise AssertionError(f"a cell raised an error: {s}")
        return s and s["kernel"] == "idle" and s["executed"] == s["cells"]

    try:
        _wait("every cell to run", all_run, timeout=60)
        status = _wait("the explorer's status line after the programmatic update",
                       lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, ".kvlab-explorer .widget-html")
                                if "int:bits=2" in e.text], timeout=15)
        img = lambda: browser.find_element(By.CSS_SELECTOR, ".kvlab-explorer .widget-output img")  # noqa: E731
        # the protocol label sits on the buttons' line, left of them (not wrapped above them)
        label = browser.find_element(By.CSS_SELECTOR, ".kvlab-explorer .kvlab-protocol-label")
        buttons = browser.find_elements(By.CSS_SELECTOR, ".kvlab-explorer .widget-toggle-buttons button")
        assert label.text.strip() == "protocol" and buttons, "no protocol label or buttons"
        lab, first = label.rect, buttons[0].rect
        assert abs((lab["y"] + lab["height"] / 2) - (first["y"] + first["height"] / 2)) < 6, (lab, first)
        assert lab["x"] + lab["width"] <= first["x"] + 1, (lab, first)
        before = _wait("the explorer's plot", lambda: img().get_attribute("src"), timeout=15)
        assert before.startswith("data:image/png"), before[:40]
        _artifact(browser, tmp_path, "explorer_before.png")

        slider = [s for s in browser.find_elements(By.CSS_SELECTOR, ".kvlab-explorer .widget-slider")
                  if s.find_element(By.CSS_SELECTOR, "label").text.strip() == "bits"]
        assert slider, "no 'bits' slider in the explorer"
        handle = slider[0].find_element(By.CSS_SELECTOR, ".noUi-handle")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
        handle.click()
        handle.send_keys(Keys.ARROW_RIGHT)              # bits 2 -> 3

        after = _wait("the plot to change after moving the bits slider",
                      lambda: (lambda s: s if s and s != before else None)(img().get_attribute("src")), timeout=30)
        assert after != before
        _wait("the status line to show 3 bits", lambda: "int:bits=3" in status[0].text, timeout=10)
        readout = slider[0].find_element(By.CSS_SELECTOR, ".widget-readout").text.strip()
        assert readout == "3"
    finally:
        _artifact(browser, tmp_path, "explorer.png")
    assert (tmp_path / "explorer.png").stat().st_size > 10_000
    assert time.monotonic() - t0 < 90

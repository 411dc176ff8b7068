"""Look at a finished sequence in the real MLflow UI, in headless Chromium, and keep screenshots.

    .venv/bin/python scripts/check_mlflow_ui.py --tracking-uri sqlite:///$PWD/moram_runs/mlflow.db \
        [--experiment trace] [--run <run name>] [--out mlflow-ui-screenshots]

Opens, as a user would (docs/mlflow.md):
  1. the experiment's runs view (the link the job prints)        -> 1-runs.png
  2. the sequence's parent run: its description (the accuracy matrix and the summary)
                                                                  -> 2-parent-overview.png
  3. the parent's metric charts (OP, BWT_signed, eval/<task> over the tasks)
                                                                  -> 3-parent-curves.png
  4. a task run's metric charts (train_loss over the steps)      -> 4-task-loss.png
  5. the task run's activation map (activation_map.png)          -> 5-task-activation-map.png
and exits 1, naming what is missing, when an expected element is not on its page.

A local store (sqlite:///...) is served for the check by ``mlflow ui`` on a free loopback port;
an http(s):// tracking URI is opened as it is. Needs Chromium (Debian: ``apt-get install -y
chromium``) and the ``playwright`` Python package (``pip install playwright``; its own browser
download is not needed: ``--chromium`` names the binary). Neither is a dependency of the platform.
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mlflow.tracking import MlflowClient  # noqa: E402

from moram_platform.tracking import KIND_TAG, NOTE_TAG, mlflow_command  # noqa: E402

MODEL_TRAINING_VIEW = "workflowType=machine_learning"   # as the job's links: the UI's "Model training" mode
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


@dataclass
class Check:
    failures: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    def expect(self, ok: bool, what: str) -> None:
        (self.passed if ok else self.failures).append(what)
        print(("  ok      " if ok else "  MISSING ") + what, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="the run's MLflow tracking URI (sqlite:///... or http://...)")
    parser.add_argument("--experiment", help="experiment name (default: the one of the newest sequence run)")
    parser.add_argument("--run", help="the sequence's run name (default: the newest finished sequence)")
    parser.add_argument("--out", default="mlflow-ui-screenshots", help="folder for the screenshots")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary")
    args = parser.parse_args(argv)

    client = MlflowClient(args.tracking_uri)
    parent, task = find_runs(client, args.experiment, args.run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"sequence run {parent.info.run_name} ({parent.info.run_id}), task run {task.info.run_name}")
    with ui_server(args.tracking_uri) as base_url:
        check = look(base_url, parent, task, out, args.chromium)
    print(f"screenshots in {out.resolve()}")
    if check.failures:
        print(f"{len(check.failures)} expected element(s) missing: " + "; ".join(check.failures), file=sys.stderr)
        return 1
    print(f"all {len(check.passed)} checks passed")
    return 0


def find_runs(client: MlflowClient, experiment: str | None, run_name: str | None):
    """(the sequence's parent run, its last task run)."""
    query = f"tags.`{KIND_TAG}` = 'sequence'" + (f" and attributes.run_name = '{run_name}'" if run_name else "")
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            sys.exit(f"error: no experiment {experiment!r} at this tracking URI")
        experiments = [found.experiment_id]
    else:
        experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string=query, order_by=["attributes.start_time DESC"],
                                 max_results=1)
    if not parents:
        sys.exit(f"error: no sequence run{' named ' + run_name if run_name else ''} at this tracking URI")
    parent = parents[0]
    tasks = client.search_runs([parent.info.experiment_id], order_by=["attributes.start_time DESC"], max_results=1,
                               filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                             f"and tags.`{KIND_TAG}` = 'task'")
    if not tasks:
        sys.exit(f"error: sequence run {parent.info.run_name} has no task run")
    return parent, tasks[0]


class ui_server:
    """The tracking server's base URL: the server itself, or ``mlflow ui`` started for a local store."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri, self.process = tracking_uri, None

    def __enter__(self) -> str:
        if self.tracking_uri.startswith(("http://", "https://")):
            return self.tracking_uri.rstrip("/")
        port = _free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="mlflow-ui-", suffix=".log", delete=False)
        self.process = subprocess.Popen([mlflow_command(), "ui", "--backend-store-uri", self.tracking_uri,
                                         "--host", "127.0.0.1", "--port", str(port)],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"error: mlflow ui exited ({self.process.returncode}); its log: {self.log.name}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                return url
            except OSError:
                time.sleep(0.5)
        sys.exit(f"error: mlflow ui did not answer on {url} within 120 s; its log: {self.log.name}")

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def look(base_url: str, parent, task, out: Path, chromium: str) -> Check:
    from playwright.sync_api import sync_playwright

    check = Check()
    experiment = parent.info.experiment_id
    runs_view = f"{base_url}/#/experiments/{experiment}/runs?{MODEL_TRAINING_VIEW}"
    parent_page = f"{base_url}/#/experiments/{experiment}/runs/{parent.info.run_id}"
    task_page = f"{base_url}/#/experiments/{experiment}/runs/{task.info.run_id}"
    note = parent.data.tags.get(NOTE_TAG, "")
    check.expect(bool(note), f"the parent run has a description ({NOTE_TAG})")
    tasks = parent.data.tags.get("moram.order", "").split(",")

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1920, "height": 1200})
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)

        print(f"1. runs view: {runs_view}")
        page.goto(runs_view)
        check.expect(_visible(page, f"text={parent.info.run_name}"), f"runs view lists {parent.info.run_name}")
        _shot(page, out / "1-runs.png")

        print(f"2. parent run: {parent_page}")
        page.goto(f"{parent_page}?{MODEL_TRAINING_VIEW}")   # the page ui_url() links
        check.expect(_visible(page, "text=Accuracy matrix"), "parent page shows the description")
        _click_if_there(page, "text=Show more")            # the UI folds a long description
        description = page.locator("table:has(td:text-is('zero-shot')), table:has(td:text-is('OP'))").first
        check.expect(_visible(page, f"td:text-is('{tasks[-1]}')"), "the description renders the matrix as a table")
        check.expect(_visible(page, "td:text-is('OP')") or "Summary" not in note, "the description shows the summary")
        if description.count():
            description.scroll_into_view_if_needed()
        _shot(page, out / "2-parent-overview.png")

        print(f"3. parent curves: {parent_page}/model-metrics")
        page.goto(f"{parent_page}/model-metrics?{MODEL_TRAINING_VIEW}")
        for key in ("OP", "BWT_signed", f"eval/{tasks[-1]}"):
            check.expect(_chart(page, key), f"parent metric chart {key}")
        _chart(page, "")                                     # every chart again, for the screenshot
        _shot(page, out / "3-parent-curves.png")

        print(f"4. task run curves: {task_page}/model-metrics")
        page.goto(f"{task_page}/model-metrics?{MODEL_TRAINING_VIEW}")
        check.expect(_chart(page, "train_loss"), "task run chart train_loss")
        _shot(page, out / "4-task-loss.png")

        print(f"5. task run activation map: {task_page}/artifacts/activation_map.png")
        page.goto(f"{task_page}/artifacts/activation_map.png?{MODEL_TRAINING_VIEW}")
        check.expect(_visible(page, "img[src*='activation_map.png'], img[alt*='activation_map']"),
                     "task run shows activation_map.png")
        _shot(page, out / "5-task-activation-map.png")
        browser.close()
    return check


def _chart(page, key: str) -> bool:
    """Filter the run's metric charts to ``key`` (charts below the fold are drawn lazily) and
    wait for that chart's title; an empty key shows every chart again."""
    search = page.get_by_placeholder("Search metric charts")
    if not _visible(page, "input[placeholder='Search metric charts']"):
        return False
    search.fill(key)
    if not key:
        return True
    title = key.rsplit("/", 1)[-1]        # charts of "eval/<task>" sit in group "eval", titled <task>
    return _visible(page, f'text="{title}"')          # the exact title, not a substring


def _click_if_there(page, selector: str) -> None:
    target = page.locator(selector).first
    if target.count():
        target.click()


def _visible(page, selector: str) -> bool:
    try:
        page.locator(selector).first.wait_for(state="visible", timeout=TIMEOUT_MS)
        return True
    except Exception:  # playwright's TimeoutError: the element never showed
        return False


def _shot(page, path: Path) -> None:
    page.wait_for_timeout(1500)  # charts and images finish drawing after the element appears
    page.screenshot(path=str(path), full_page=True)
    print(f"   saved {path}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())

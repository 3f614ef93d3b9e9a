"""The dashboard (service/dashboard.html) in a real browser: Debian's headless Chromium, driven by
Playwright, against a live `feathertune serve` — log in, follow a finished job's loss and events,
chat with its fine-tuned model, start and cancel a job from the form.

No browser is downloaded: Playwright drives /usr/bin/chromium (`apt-get install chromium`).
FEATHERTUNE_SCREENSHOTS=DIR keeps a copy of the full-page screenshot in DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from live import FAST_OPTIONS, KEY, wait_status, workspace_server

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("openai")

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling Google's services, and on an
# offline machine floods the log with refused connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DASHBOARD = Path(__file__).resolve().parents[2] / "src" / "feathertune" / "service" / "dashboard.html"
STEPS, EVAL_EVERY = 12, 4
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """A live server and one job run to `succeeded` through the openai client, logging every step."""
    started = time.time()
    with workspace_server(tmp_path_factory.mktemp("dashboard")) as live:
        root, client = live.root, live.client()
        train = client.files.create(file=(root / "train.jsonl").open("rb"), purpose="fine-tune")
        validation = client.files.create(file=(root / "validation.jsonl").open("rb"), purpose="fine-tune")
        options = json.loads(json.dumps(FAST_OPTIONS))
        options["train"].update(max_steps=STEPS, log_every=1, eval_every=EVAL_EVERY)
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=train.id, validation_file=validation.id, suffix="dash",
            method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
            extra_body={"feathertune": options})
        job = wait_status(client, job.id, {"succeeded", "failed", "cancelled"})
        assert job.status == "succeeded", job.error
        print(f"\n[dashboard] server + job: {time.time() - started:.1f} s")
        yield live, job


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own local storage) that fails the test on any uncaught script error."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())  # the cancel button's confirm()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def log_in(page, base: str, key: str) -> None:
    page.goto(base + "/")
    page.fill("#key", key)
    page.click("#login")


def test_the_page_never_puts_server_text_in_as_html():
    html = DASHBOARD.read_text()
    assert "innerHTML" not in html and "outerHTML" not in html and "insertAdjacentHTML" not in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html  # offline


def test_a_wrong_key_is_refused_with_a_message(finished_job, page):
    live, _ = finished_job
    log_in(page, live.base, "not-the-key")
    page.wait_for_selector("#login-error:has-text('refused the key')")
    assert "Incorrect API key" in page.text_content("#login-error")
    assert page.is_hidden("#app") and page.evaluate("localStorage.length") == 0


def test_a_job_its_loss_events_and_chat(finished_job, page, tmp_path):
    live, job = finished_job
    started = time.time()
    log_in(page, live.base, KEY)
    row = page.wait_for_selector(f"#jobs tr[data-job-id='{job.id}']")
    assert "succeeded" in row.text_content() and job.fine_tuned_model in row.text_content()
    assert page.evaluate("localStorage.getItem('feathertune.key')") == KEY  # kept for the next visit

    row.click()
    page.wait_for_function(f"(document.querySelector('#loss-chart path.train-loss')?.getAttribute('d') || '')"
                           f".split('L').length === {STEPS}")  # M + one L per further step
    assert page.locator("#loss-chart > circle.valid-loss").count() == STEPS // EVAL_EVERY
    assert page.locator("#loss-chart text.tick").count() >= 6 and page.locator("#loss-chart .legend").count() == 2
    page.wait_for_selector("#events li:has-text('The job has successfully completed')")
    assert "successfully completed" in page.locator("#events li").first.text_content()  # newest first
    assert page.is_visible("#job-chat") and page.is_hidden("#job-cancel") and page.is_hidden("#job-resume")

    page.wait_for_selector(f"#chat-model option[value='{job.fine_tuned_model}']", state="attached")
    page.select_option("#chat-model", job.fine_tuned_model)
    page.fill("#chat-max-tokens", "16")
    page.fill("#chat-input", "name[The Eagle], eatType[coffee shop], food[Italian]")
    page.click("#chat-send")
    page.wait_for_function("(document.querySelector('#chat-log .msg.assistant:not(.pending) .text')?.textContent"
                           " || '').trim().length > 0")
    assert page.locator("#chat-log .msg.error").count() == 0
    print(f"[dashboard] log in → chart, events and a chat reply: {time.time() - started:.1f} s")

    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    if os.environ.get("FEATHERTUNE_SCREENSHOTS"):
        keep = Path(os.environ["FEATHERTUNE_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        screenshot = Path(shutil.copy(screenshot, keep / "dashboard.png"))
    print(f"[dashboard] screenshot: {screenshot}")


def test_the_form_starts_a_job_and_cancel_stops_it(finished_job, page):
    live, job = finished_job
    log_in(page, live.base, KEY)
    page.wait_for_selector(f"#jobs tr[data-job-id='{job.id}']")
    page.set_input_files("#train-file", str(live.root / "train.jsonl"))
    page.select_option("#base-model", "tiny")
    page.fill("#suffix", "form")
    page.fill("#n-epochs", "20")  # ~1000 steps: still running when it is cancelled
    page.click("#create-job")
    page.wait_for_selector("#new-job-status:has-text('Created ftjob-')")
    new_id = page.text_content("#new-job-status").split()[-1]
    page.wait_for_selector(f"#jobs tr[data-job-id='{new_id}'].selected")  # created and selected
    # The chart follows the run: it is drawn once the first steps are logged, before the job ends.
    page.wait_for_function("(document.querySelector('#loss-chart path.train-loss')?.getAttribute('d') || '')"
                           ".includes('L')", timeout=60_000)
    assert page.text_content("#job-status") == "running"
    page.click("#job-cancel")
    page.wait_for_selector(f"#jobs tr[data-job-id='{new_id}'] .badge.cancelled")
    assert live.client().fine_tuning.jobs.retrieve(new_id).status == "cancelled"

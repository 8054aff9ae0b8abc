"""End to end in headless Chromium: upload, browse, ask, see the TG-IS curve, click a bar.

Needs Debian's ``chromium`` and ``chromium-driver`` (no browser download) and ``selenium``; the test
fails, not skips, without them. Set ``MED2E3_SCREENSHOT=docs/images/webapp.png`` to also save the
page for the docs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import pytest
from server_helpers import running_server, synthetic_ct

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,960",
    "--hide-scrollbars",
)
WAIT_S = 30


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: install Debian's browser with 'apt-get install -y chromium chromium-driver'"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_ask_and_click_a_bar(browser, live_server: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    volume, affine = synthetic_ct(shape=(48, 160, 160), index=3)
    scan = tmp_path / "abdomen-ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), scan)
    wait = WebDriverWait(browser, WAIT_S)
    js = browser.execute_script

    browser.get(live_server + "/")
    wait.until(lambda d: d.find_element(By.ID, "server-status").text == "connected")
    assert [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#examples button")] == [
        "Plane",
        "Phase",
        "Organ",
        "Abnormality",
        "Location",
    ]

    # upload through the file input; the viewer shows the middle slice
    browser.find_element(By.ID, "file").send_keys(str(scan))
    wait.until(lambda d: "48 × 160 × 160" in d.find_element(By.ID, "volume-info").text)
    wait.until(
        lambda d: js("const i = document.getElementById('slice'); return i.complete && i.naturalWidth") == 160
    )
    assert browser.find_element(By.ID, "slice").get_attribute("data-slice") == "24"

    # CT window presets re-render the slice server-side
    browser.find_element(By.CSS_SELECTOR, "#windows button[data-window='bone']").click()
    wait.until(lambda d: d.find_element(By.ID, "slice").get_attribute("data-window") == "bone")
    browser.find_element(By.CSS_SELECTOR, "#windows button[data-window='abdomen']").click()
    wait.until(lambda d: d.find_element(By.ID, "slice").get_attribute("data-window") == "abdomen")

    # an example question, answered (streamed) with its TG-IS curve
    browser.find_element(By.CSS_SELECTOR, "#examples button[data-type='Organ']").click()
    question = browser.find_element(By.ID, "question").get_attribute("value")
    assert question == "Which organ can be seen in this image?"
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#top-slices button")) == 4)
    assert browser.find_element(By.ID, "answer-question").text == f"Q: {question}"
    assert browser.find_element(By.ID, "answer-text").text.strip()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar")) == 32
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar.top")) == 4
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    ranges = js("return state.answer.slice_ranges")
    assert len(ranges) == 32 and ranges[-1][1] <= 48

    # clicking a bar shows that model slice's first original slice, in the viewer and on the slider
    for j in (5, 27):
        browser.find_element(By.CSS_SELECTOR, f"#chart rect.hit[data-j='{j}']").click()
        expected = str(ranges[j][0])
        wait.until(lambda d, k=expected: d.find_element(By.ID, "slice").get_attribute("data-slice") == k)
        assert browser.find_element(By.ID, "depth").get_attribute("value") == expected
        assert (
            browser.find_element(By.CSS_SELECTOR, f"#chart rect.bar[data-j='{j}']")
            .get_attribute("class")
            .endswith("current")
        )

    # a report on the same volume (no new upload)
    browser.find_element(By.ID, "report").click()
    wait.until(lambda d: d.find_element(By.ID, "answer-question").text == "Report")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#top-slices button")) == 4)

    # ask again so the screenshot shows a question, its answer and the curve
    browser.find_element(By.ID, "question").clear()
    browser.find_element(By.ID, "question").send_keys("Which organ shows the cyst?")
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_element(By.ID, "answer-question").text == "Q: Which organ shows the cyst?")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#top-slices button")) == 4)
    wait.until(lambda d: not d.find_element(By.ID, "ask").get_attribute("disabled"))
    history = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#history li")]
    assert [h.split(" — ")[0] for h in history] == ["Report", f"Q: {question}"]
    browser.find_element(By.CSS_SELECTOR, "#chart rect.hit[data-j='14']").click()
    wait.until(lambda d: d.find_element(By.ID, "slice").get_attribute("data-slice") == str(ranges[14][0]))

    shot = tmp_path / "webapp.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("MED2E3_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MED2E3_SCREENSHOT"])

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors  # no script errors, no CSP violations, no failed requests


TOKEN = "0123456789abcdef-e2e-token"


def test_token_mode_page_survives_a_reload_and_asks_for_a_missing_token(browser, predictor) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)

    def status(text: str):
        return lambda d: d.find_element(By.ID, "server-status").text == text

    with running_server(predictor, token=TOKEN) as url:
        browser.get(f"{url}/?token={TOKEN}")
        wait.until(status("connected"))
        assert browser.current_url == url + "/"  # the token left the address bar
        browser.refresh()
        wait.until(status("connected"))
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None

        browser.execute_script("sessionStorage.clear()")  # as a new tab opened without the token
        browser.get(url + "/")
        wait.until(status("token needed"))
        form = browser.find_element(By.ID, "token-form")
        assert form.is_displayed() and "needs a token" in browser.find_element(By.ID, "error").text
        browser.find_element(By.ID, "token").send_keys("wrong-token-wrong-token")
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        wait.until(lambda d: d.find_element(By.ID, "error").text == "wrong token")
        browser.find_element(By.ID, "token").clear()
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        wait.until(status("connected"))
        assert not form.is_displayed()
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
        assert len(browser.find_elements(By.CSS_SELECTOR, "#examples button")) == 5

"""The search page end to end in headless Chromium: upload a photo through the page, see its product.

Needs Debian's `chromium` + `chromium-driver` (apt) and selenium (the test extra); .ci/run installs them.
The screenshot goes to $PYTEST_ARTIFACTS (else the test's tmp_path) and its path is printed.
"""

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("selenium", reason="the browser test needs selenium: pip install -e '.[test]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from retrieval.datasets import load_viton  # noqa: E402
from retrieval.descriptors import create_descriptor  # noqa: E402
from street2shop import Pipeline  # noqa: E402
from street2shop.engine import build_index  # noqa: E402
from street2shop.service import ServiceSettings  # noqa: E402
from street2shop.service.server import background_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless Chromium not found: apt-get install -y chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # both paths given: no download
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_shows_the_product_of_an_uploaded_street_photo(browser, synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    index_dir = tmp_path / "idx"
    build_index(data.catalog, create_descriptor("colorhist"), index_dir, progress=False, faiss_device="cpu")
    # A street photo whose product the pipeline ranks first: the page must show that product first.
    pipeline = Pipeline.load(index_dir, device="cpu")
    found = [hit.hits[0].product_id for hit in pipeline.search(list(data.queries["image"]), k=1)]
    right = [i for i, (pid, truth) in enumerate(zip(found, data.queries["product_id"])) if pid == str(truth)]
    assert right, "colorhist finds none of the synthetic street photos' products: the fixture is too hard"
    query = data.queries.iloc[right[0]]

    with background_server(index_dir, ServiceSettings(device="cpu")) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 10).until(
            expected_conditions.text_to_be_present_in_element((By.ID, "catalog-info"), "products")
        )
        # keyboard: the first Tab lands on the drop zone, which is a button
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        assert browser.switch_to.active_element.get_attribute("id") == "drop-zone"
        browser.find_element(By.ID, "file-input").send_keys(str(Path(query["image"]).resolve()))
        WebDriverWait(browser, 20).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#results li.result"))
        )
        WebDriverWait(browser, 10).until(
            lambda driver: driver.execute_script(
                "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        first = browser.find_element(By.CSS_SELECTOR, "#results li.result")
        assert first.get_attribute("data-product-id") == str(query["product_id"])
        assert "#1" in first.text and "score" in first.text
        assert browser.find_element(By.ID, "proxy-image").get_attribute("src").startswith("data:image/png")
        assert "Found" in browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "timings").is_displayed()
        artifacts = Path(os.environ.get("PYTEST_ARTIFACTS") or tmp_path)
        artifacts.mkdir(parents=True, exist_ok=True)
        screenshot = artifacts / "search-page.png"
        assert browser.save_screenshot(str(screenshot))
        print(f"screenshot of the search page: {screenshot}")

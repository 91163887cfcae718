"""The page at / in a real headless Chromium (selenium + chromium-driver): upload -> overlay, a click refines
the mask, saving writes polygons training data that `vseg check` accepts."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from vseg.cli import main as vseg_main
from vseg.data.synthetic import generate_vessels
from vseg.serve import Running, config_from_args, free_port

DRIVER = shutil.which("chromedriver")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(
    DRIVER is None or BROWSER is None,
    reason="needs chromium and chromium-driver (apt-get install -y chromium chromium-driver; .ci/run installs them)",
)


def wait_for(driver, condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out; status: {driver.find_element('id', 'status').text}")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_upload_overlay_refine_save(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    data = tmp_path / "data"
    data.mkdir()
    running = Running(
        config_from_args(["ckpt=random", "model=tiny", "device=cpu", f"port={free_port()}", f"data_root={data}"])
    )
    try:
        for i in range(2):  # `vseg check` splits train / val: two saved images
            image = generate_vessels(seed=500 + i, size=96, style="angiogram")[0]
            path = tmp_path / f"scan{i}.png"
            Image.fromarray(image).save(path)
            browser.get(running.url + "/")
            browser.find_element("id", "file").send_keys(str(path))
            canvas = browser.find_element("id", "canvas")
            wait_for(browser, lambda d, c=canvas: c.get_attribute("data-state") in ("segmented", "error"))
            assert canvas.get_attribute("data-state") == "segmented", browser.find_element("id", "status").text
            assert int(canvas.get_attribute("width")) == 96  # the overlay is drawn at the image's size
            overlay = browser.find_element("id", "download-overlay").get_attribute("href")
            assert overlay.startswith("data:image/png;base64,")
            # a click sends a point to /v1/refine and the mask is redrawn from its answer
            ActionChains(browser).move_to_element_with_offset(canvas, 10, 5).click().perform()
            wait_for(browser, lambda d, c=canvas: c.get_attribute("data-state") in ("refined-1", "error"))
            assert canvas.get_attribute("data-state") == "refined-1", browser.find_element("id", "status").text
            foreground = int(canvas.get_attribute("data-foreground"))
            # the threshold slider re-thresholds in the page: at 0.01 nearly everything is vessel
            browser.execute_script(
                "const t = document.getElementById('threshold'); t.value = 0.01; t.dispatchEvent(new Event('input'));"
            )
            assert int(canvas.get_attribute("data-foreground")) >= foreground
            browser.find_element("id", "save").click()
            wait_for(browser, lambda d, c=canvas: c.get_attribute("data-saved"))
        entries = json.loads((data / "annotations.json").read_text())
        assert [e["image"] for e in entries] == ["scan0.png", "scan1.png"]
        saved = np.asarray(Image.open(data / "scan0.png"))
        assert saved.shape == (96, 96, 3)
        assert (
            vseg_main(
                ["check", "data=polygons", f"data.annotations={data / 'annotations.json'}", "data.image_size=null"]
            )
            == 0
        )
    finally:
        running.stop()

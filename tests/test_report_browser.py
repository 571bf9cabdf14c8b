"""The HTML report in a real browser: headless Chromium driven by chromedriver (selenium).

Opens ``index.html`` from disk (``file://``, no server, no network), sorts the ranking
table by a metric and checks the order, filters it to the affected samples, opens a
sample page, and checks that no image is broken, that no script logged an error, and
that a label containing ``<script>`` is shown as text (no alert, no injected element).

Skipped, with the reason, only when selenium, ``chromium`` or ``chromedriver`` is not
installed; ``.ci/run`` installs them so that CI always runs it. Also usable by hand to
take the README's screenshot::

    python tests/test_report_browser.py screenshot REPORT_FOLDER docs/report.png
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_report import EVIL, make_sweep, report_with_images  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not CHROMIUM or not CHROMEDRIVER:
        return (
            "chromium and chromedriver are not installed "
            "(apt-get install chromium chromium-driver; .ci/run does this)"
        )
    return None


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 900) -> Iterator[object]:
    """A headless Chromium under chromedriver that keeps the console log, offline."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mlvar-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _broken_images(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.images)"
        ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);"
    )


def _assert_no_alert(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018 - the property raises when there is none


def _column(driver, key: str) -> list[str]:
    """Texts of the visible ranking rows in the column whose header has ``data-key``."""
    return driver.execute_script(
        "const t = document.getElementById('ranking');"
        "const i = Array.from(t.tHead.rows[0].cells)"
        ".findIndex(c => c.dataset.key === arguments[0]);"
        "return Array.from(t.tBodies[0].rows).map(r => r.cells[i].textContent);",
        key,
    )


def _order(values: np.ndarray, ranks: np.ndarray, descending: bool) -> list[int]:
    """Row order of the table's sort: by value (missing last), ties by rank."""
    sign = -1.0 if descending else 1.0

    def key(i: int) -> tuple:
        v = values[i]
        return (bool(np.isnan(v)), 0.0 if np.isnan(v) else sign * v, ranks[i])

    return sorted(range(len(values)), key=key)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    return report_with_images(tmp_path_factory.mktemp("browser"), n=400, top=8)


def test_report_in_headless_chromium(built) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    result, ranking = built
    index = result.path
    metric = "disagreement"
    with browser() as driver:
        driver.get(index.resolve().as_uri())
        _assert_no_alert(driver)
        assert driver.find_elements(By.CSS_SELECTOR, "#ranking tbody tr"), "table not rendered"
        assert _broken_images(driver) == []
        # The label with a script tag is shown as text, not run or parsed.
        labels = _column(driver, "label")
        assert EVIL in labels
        assert driver.execute_script("return document.querySelectorAll('td script').length") == 0

        # Sort by a metric: first click ascending, second descending (missing values last).
        values = np.round(ranking[metric].to_numpy(dtype=float), 6)
        ranks = ranking["rank"].to_numpy()
        ids = ranking["sample_id"].astype(str).to_numpy()
        button = driver.find_element(By.CSS_SELECTOR, f'#ranking th[data-key="{metric}"] button')
        button.click()
        asc = _order(values, ranks, descending=False)
        assert _column(driver, "sample_id") == [ids[i] for i in asc[:50]]
        shown = [float(v) for v in _column(driver, metric)]
        assert shown == sorted(shown)
        button.click()
        desc = _order(values, ranks, descending=True)
        assert _column(driver, "sample_id") == [ids[i] for i in desc[:50]]
        th = driver.find_element(By.CSS_SELECTOR, f'#ranking th[data-key="{metric}"]')
        assert th.get_attribute("aria-sort") == "descending"

        # Filter to the affected samples.
        n_affected = int(ranking["affected"].sum())
        Select(driver.find_element(By.ID, "filter-affected")).select_by_value("affected")
        rows = driver.find_elements(By.CSS_SELECTOR, "#ranking tbody tr")
        assert rows and all("affected" in r.get_attribute("class").split() for r in rows)
        assert _column(driver, "affected") == ["yes"] * min(50, n_affected)
        count = driver.find_element(By.ID, "ranking-count").text
        assert count.startswith(f"{n_affected} of {len(ranking)} ")

        # Open a sample page from the table.
        driver.find_element(By.ID, "filter-pages").click()
        link = driver.find_element(By.CSS_SELECTOR, "#ranking tbody tr a")
        sample_id = link.text
        link.click()
        WebDriverWait(driver, 10).until(lambda d: "/samples/" in d.current_url)
        assert driver.find_element(By.ID, "sample-id").text == sample_id
        assert _broken_images(driver) == []
        assert driver.find_elements(By.CSS_SELECTOR, ".sample-input img"), "no sample image"
        votes = driver.find_elements(By.CSS_SELECTOR, "#votes tr")
        assert len(votes) == 1 + 3  # header + one row per class
        _assert_no_alert(driver)
        # Every sample page with the script label shows it as text.
        page = next(
            p
            for p in sorted(index.parent.glob("samples/*.html"))
            if 'id="sample-label">&lt;script&gt;' in p.read_text()
        )
        driver.get(page.resolve().as_uri())
        assert driver.find_element(By.ID, "sample-label").text == EVIL
        _assert_no_alert(driver)
        errors = _console_errors(driver)
        assert errors == [], errors


@pytest.fixture(scope="module")
def study_site(tmp_path_factory: pytest.TempPathFactory):
    """A site of a sweep: 4 ratios of one mode, 2 clusters of another (make_sweep)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from mlvar.report.study import build_site

    root = tmp_path_factory.mktemp("study-site")
    names = make_sweep(root / "runs")
    build_site(root / "runs", root / "site", top=3)
    return root / "site", names


def _page_is_clean(driver) -> None:
    assert _broken_images(driver) == []
    _assert_no_alert(driver)
    errors = _console_errors(driver)
    assert errors == [], errors


def test_study_site_in_headless_chromium(study_site) -> None:
    """The index's plots load; its family list leads to family pages whose plots load and
    whose links reach every experiment of the family; the reports open; no console
    error anywhere."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    site, names = study_site
    with browser() as driver:
        driver.get((site / "index.html").resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.src, i.naturalWidth]);"
        )
        assert len(images) >= 3 and all(width > 300 for _, width in images), images
        _page_is_clean(driver)
        families = [
            (a.text, a.get_attribute("href"))
            for a in driver.find_elements(By.CSS_SELECTOR, "#family-list a")
        ]
        assert len(families) == 2
        assert any(t == "synthetic / <i>hold</i>" for t, _ in families)  # shown as text
        reached = set()
        for title, href in families:
            driver.get(href)
            assert driver.find_element(By.TAG_NAME, "h1").text == f"mlvar study: {title}"
            plots = driver.find_elements(By.CSS_SELECTOR, "img.plot")
            assert len(plots) >= 4  # metrics, accuracy, ranks, boxplot
            _page_is_clean(driver)
            links = driver.find_elements(By.CSS_SELECTOR, "#family-experiments a")
            reached |= {a.text for a in links}
            for a in links:
                assert a.get_attribute("href").endswith(f"/{a.text}/index.html")
        assert reached == set(names)
        # Follow one family link through to an experiment's report and back.
        driver.get(families[0][1])
        link = driver.find_element(By.CSS_SELECTOR, "#family-experiments a")
        name = link.text
        link.click()
        WebDriverWait(driver, 10).until(lambda d: f"/{name}/index.html" in d.current_url)
        WebDriverWait(driver, 10).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#ranking tbody tr")
        )
        _page_is_clean(driver)
        driver.find_element(By.ID, "study-link").click()  # the report leads back
        WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith("/site/index.html"))
        for name in names:
            assert driver.find_elements(By.LINK_TEXT, name), name
        _page_is_clean(driver)


def test_console_errors_are_caught(built, tmp_path: Path) -> None:
    """The check above would see a script error (guards against a silent logger)."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><title>x</title><script>undefinedFunction();</script>")
    with browser() as driver:
        driver.get(bad.as_uri())
        assert any("undefinedFunction" in e for e in _console_errors(driver))


def screenshot(report: Path, out: Path, width: int = 1100, height: int = 1250) -> None:
    """Save a small PNG of the top of ``report/index.html`` (palette, < 300 KB)."""
    from PIL import Image

    with browser(width, height) as driver:
        driver.get((report / "index.html").resolve().as_uri())
        raw = out.with_suffix(".raw.png")
        driver.save_screenshot(str(raw))
    img = Image.open(raw).convert("RGB")
    img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.LANCZOS)
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    raw.unlink()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "screenshot":
        screenshot(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)


def test_tabular_sample_page_with_attributions(tmp_path: Path, compas_csv: Path) -> None:
    """A COMPAS MLP report after 'analyze saliency': a sample page shows the chart and the
    per-feature attribution table, with no broken image and no console error."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By

    from mlvar.config import Config, PathsConfig
    from mlvar.data.registry import prepare
    from mlvar.report.html import build_report
    from mlvar.saliency import saliency
    from mlvar.store import ExperimentStore
    from mlvar.train.service import train

    (tmp_path / "data" / "raw").mkdir(parents=True)
    shutil.copyfile(compas_csv, tmp_path / "data" / "raw" / "compas-scores-two-years.csv")
    prepare(tmp_path / "data", "compas", mode="artificial", ratio=0.1)
    config = Config(paths=PathsConfig(tmp_path / "data", tmp_path / "runs", tmp_path / "r"))
    train(config, "compas", runs=2, name="tab", overrides={"epochs": 2})
    store = ExperimentStore.open(tmp_path / "runs", "tab")
    result = saliency(store, tmp_path / "data", top=2, seeds=2)
    report = build_report(store, tmp_path / "report", top=2, data_root=tmp_path / "data")
    sid = int(result.samples["sample_id"][0])
    with browser() as driver:
        driver.get((report.path.parent / "samples" / f"sample-{sid}.html").resolve().as_uri())
        assert _broken_images(driver) == []
        chart = driver.find_element(By.CSS_SELECTOR, ".attribution img")
        assert driver.execute_script("return arguments[0].naturalWidth", chart) > 300
        rows = driver.find_elements(By.CSS_SELECTOR, "#features tr")
        assert len(rows) == 1 + len(result.feature_names)
        header = [c.text for c in rows[0].find_elements(By.TAG_NAME, "th")]
        assert header[2:] == ["gradient x input, true class", "gradient x input, predicted class"]
        assert all("±" in c.text for c in rows[1].find_elements(By.TAG_NAME, "td")[2:])
        errors = _console_errors(driver)
        assert errors == [], errors

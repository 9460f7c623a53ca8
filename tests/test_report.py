"""RUN/report.html: escaped user data, files that exist, and a real browser that loads it
from disk without touching the network."""
from __future__ import annotations

import html.parser
import os
import shutil
from pathlib import Path

import pytest

from conftest import make_folder, run_cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EVIL_CLASS = "<b>bold"
EVIL_FILE = "<img src=x onerror=alert(1)>.png"


@pytest.fixture(scope="module")
def evil_run(tmp_path_factory):
    """A run whose class and file names are HTML, with test mistakes: every image is in both
    classes (identical copies share a split, so every copy pair in test has one wrong)."""
    import tlapp

    base = tmp_path_factory.mktemp("evil")
    data = make_folder(base / "data", per_class=10, classes={EVIL_CLASS: 0.0})
    (data / "dog").mkdir()
    for image in sorted((data / EVIL_CLASS).iterdir()):
        shutil.copy(image, data / "dog" / image.name.replace(EVIL_CLASS, "dog"))
    (data / EVIL_CLASS / EVIL_FILE).write_bytes(b"")  # skipped, and listed by name
    return tlapp.train(str(data), backbone="resnet50", weights="none", image_size=32,
                       epochs=2, batch_size=8, test_fraction=0.3,
                       cache_dir=str(base / "cache"), out=str(base / "run"))


class References(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.found, self.scripts = [], 0

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        self.found += [value for name, value in attrs if name in ("src", "href") and value]


def references(page: Path) -> References:
    parser = References()
    parser.feed(page.read_text())
    return parser


@pytest.mark.slow
def test_names_are_shown_as_text_and_never_run(evil_run):
    page = (evil_run.path / "report.html").read_text()
    assert "&lt;b&gt;bold" in page and "&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert EVIL_CLASS not in page and EVIL_FILE not in page
    assert "<script" not in page.lower()  # a run report has no script a name could reach
    assert references(evil_run.path / "report.html").scripts == 0


@pytest.mark.slow
def test_the_report_states_the_label_conflicts_the_scan_found(evil_run):
    """Every image of the run is in both classes: report.html says so, as the model card
    does (before: it counted duplicates only)."""
    page = (evil_run.path / "report.html").read_text()
    assert "<li>Label conflicts: 10 image content(s) appear under more than one class, so " \
           "their labels disagree.</li>" in page
    assert "<li>Duplicates: " in page


@pytest.mark.slow
def test_every_referenced_file_exists_and_thumbnails_are_small(evil_run):
    found = references(evil_run.path / "report.html").found
    assert any(ref.startswith("plots/") for ref in found)
    gallery = [ref for ref in found if ref.startswith("report_files/")]
    assert gallery, "the fixture has test mistakes: the gallery shows them"
    assert any(ref.endswith("-gradcam.jpg") for ref in gallery)
    for ref in found:
        assert not ref.startswith(("http:", "https:", "//")), ref
        assert (evil_run.path / ref).is_file(), ref
    for ref in gallery:
        assert (evil_run.path / ref).stat().st_size < 30_000


@pytest.mark.slow
def test_report_loads_in_headless_chromium_without_network(evil_run, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does it)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install "
                                          "\"tlapp[test]\")")
    seen, failed = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND"])
        context = browser.new_context(service_workers="block")
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
            ("file:", "data:")) else route.abort())
        page = context.new_page()
        page.on("request", lambda request: seen.append(request.url))
        page.on("requestfailed", lambda request: failed.append(request.url))
        dialogs = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        for width in (1280, 390):
            page.set_viewport_size({"width": width, "height": 800})
            page.goto((evil_run.path / "report.html").resolve().as_uri(), wait_until="load")
            shot = tmp_path / f"report-{width}.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5000
            broken = page.evaluate("() => [...document.images].filter(i => !i.complete || "
                                   "i.naturalWidth === 0).map(i => i.src)")
            assert broken == []
            # nothing wider than the phone's screen but the scrollable tables
            assert page.evaluate("() => document.body.scrollWidth") <= width + 1
        assert page.locator("text=<b>bold").count() > 0  # shown as text
        browser.close()
    assert failed == [] and dialogs == []
    assert [url for url in seen if not url.startswith(("file:", "data:"))] == []


@pytest.mark.slow
def test_a_run_without_gradcam_shows_the_mistakes_and_report_draws_them(evil_run, tmp_path,
                                                                        capsys):
    """gradcam = "off" (the default of an experiment's runs): report.html lists the
    mistakes without overlays, says how to get them, and 'tlapp report RUN' draws them."""
    import tlapp

    run = tlapp.pipeline.run(evil_run.config.replace(out=str(tmp_path / "run"), epochs=1,
                                                     gradcam="off"))
    gallery = references(run.path / "report.html").found
    assert any(ref.endswith(".jpg") for ref in gallery)
    assert not any(ref.endswith("-gradcam.jpg") for ref in gallery)
    assert "tlapp report RUN" in (run.path / "report.html").read_text()
    code, out, err = run_cli(capsys, "report", run.path)
    assert code == 0, err
    assert any(ref.endswith("-gradcam.jpg") for ref in references(run.path / "report.html").found)


@pytest.mark.slow
def test_report_command_rewrites_and_refuses_unfinished_runs(evil_run, tmp_path, capsys):
    (evil_run.path / "report.html").unlink()
    code, out, err = run_cli(capsys, "report", evil_run.path)
    assert code == 0, err
    assert (evil_run.path / "report.html").is_file()
    partial = tmp_path / "partial"
    shutil.copytree(evil_run.path, partial, ignore=shutil.ignore_patterns("metrics.json"))
    code, out, err = run_cli(capsys, "report", partial)
    assert code == 2 and "not a finished run" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "report", tmp_path / "nothing")
    assert code == 2 and "not a tlapp run folder" in err


@pytest.mark.slow
def test_model_card_of_a_run_with_html_names_and_conflicts(evil_run, capsys):
    """MODEL_CARD.md (issue 16): the class and skipped file names stay text, and the scan's
    label conflicts (every image is in both classes) are among the limitations;
    `tlapp report` writes the card again."""
    from test_model_card import render, table_with

    card = evil_run.path / "MODEL_CARD.md"
    card.unlink()
    code, out, err = run_cli(capsys, "report", evil_run.path)
    assert code == 0 and "MODEL_CARD.md" in out, err
    text = card.read_text()
    rendered = render(text)
    assert "<b>" not in rendered and "<img" not in rendered
    assert [r[1] for r in table_with(rendered, ["index", "class"])] == [EVIL_CLASS, "dog"]
    assert table_with(rendered, ["reason", "files", "for example"]) == [
        ["empty", "1", f"{EVIL_CLASS}/{EVIL_FILE}"]]
    assert "Label conflicts: 10 image content(s) appear under more than one class" in text

"""The executed course as a static HTML book (course_utils.machinery.book), checked in headless Chromium.

The book is rendered from the smoke run that tests/test_notebooks.py also checks (the session fixture
``smoke_notebooks`` executes each notebook once). Without network access, as a student's offline copy
would be: every request that is not a ``file:`` URL is aborted. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import pytest
from test_browser import ARTIFACTS, CHROMIUM_FLAGS, chromium  # noqa: F401  (the chromium fixture)
from test_notebooks import NOTEBOOKS

from course_utils.machinery import book

CJK_SAMPLE = "学习"  # glyphs any CJK font has
MISSING_GLYPHS = "\ue000"  # private use area: no font draws it (a tofu box)


@pytest.fixture(scope="session")
def smoke_book(smoke_notebooks, tmp_path_factory):
    pytest.importorskip("papermill")
    executed = [smoke_notebooks(path) for path in NOTEBOOKS]
    out = tmp_path_factory.mktemp("book")
    index = book.build_book(executed[0].parent, out)
    return {"index": index, "executed": executed, "out": out}


def outputs(nb: dict, predicate) -> int:
    return sum(1 for c in nb["cells"] for o in c.get("outputs", []) if predicate(o))


def is_banner(output) -> bool:
    return "border:2px solid #c00" in "".join(output.get("data", {}).get("text/html", ""))


def test_missing_notebooks_say_to_run_the_course_first(tmp_path, capsys):
    with pytest.raises(book.BookError, match=r"python -m course_utils course"):
        book.build_book(tmp_path, tmp_path / "book")
    assert book.main(["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "book")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "python -m course_utils course" in err
    assert not (tmp_path / "book").exists()


def test_run_time_from_papermill_metadata():
    nb = {"metadata": {"papermill": {"duration": 75.4}}, "cells": []}
    assert book.run_seconds(nb) == 75.4 and book.format_seconds(75.4) == "1 min 15 s"
    cells = [{"metadata": {"papermill": {"duration": d}}} for d in (1.5, 2.0)] + [{"metadata": {}}]
    assert book.run_seconds({"metadata": {}, "cells": cells}) == 3.5
    assert book.run_seconds({"metadata": {}, "cells": [{"metadata": {}}]}) is None


@pytest.mark.slow
def test_book_pages_keep_every_output_and_link_the_lessons(smoke_book):
    out, executed = smoke_book["out"], smoke_book["executed"]
    index = smoke_book["index"].read_text(encoding="utf-8")
    pages = [out / (p.stem + ".html") for p in executed]
    hrefs = re.findall(r'href="([^"]+)"', index)
    assert [h for h in hrefs if h != "glossary.html"] == [p.name for p in pages] and "glossary.html" in hrefs
    for i, (path, page) in enumerate(zip(executed, pages)):
        nb = json.loads(path.read_text(encoding="utf-8"))
        summary = book.lesson_summary(nb, path)
        assert summary["preset"] == "smoke" and not summary["failed"]
        goals = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", summary["goals"])  # a link shows its text
        first_goal = re.sub(r"[*`]", "", goals).splitlines()[0]
        assert "学习目标" in "".join(nb["cells"][0]["source"]) and first_goal[3:12] in re.sub(
            r"<[^>]+>", "", index
        )
        assert book.format_seconds(nb["metadata"]["papermill"]["duration"]) in index
        text = page.read_text(encoding="utf-8")
        # no widget shown as its text repr or as a progress bar frozen at its start (drawn from saved state)
        assert not re.search(r"\w+\(children=|HBox\(|VBox\(|\b0%\|", text), page.name
        code_cells = sum(1 for c in nb["cells"] if c["cell_type"] == "code")
        assert text.count('<details class="book-code"') == code_cells
        pngs = outputs(nb, lambda o: "image/png" in o.get("data", {}))
        figures = re.findall(r'<img (?![^>]*class="book-widget")[^>]*src="data:image/png;base64,', text)
        assert pngs > 0 and len(figures) == pngs, page.name  # besides the figures widgets draw (the panel's)
        assert text.count("border:2px solid #c00") == outputs(nb, is_banner), page.name
        assert 'href="index.html"' in text
        prev_next = re.findall(r'class="book-(prev|next)" href="([^"]+)"', text)
        one_nav = ([("prev", pages[i - 1].name)] if i > 0 else []) + (
            [("next", pages[i + 1].name)] if i + 1 < len(pages) else []
        )
        assert prev_next == 2 * one_nav, page.name  # the bar above the lesson and the one below
    panel = next(p for p in pages if p.name.startswith("04_")).read_text(encoding="utf-8")
    assert "schedule-table" in panel and 'type="range"' in panel, "04's panel is not drawn from its state"
    assert sum("<progress" in p.read_text(encoding="utf-8") for p in pages) >= 3, "progress bars are gone"
    assert sum(outputs(json.loads(p.read_text(encoding="utf-8")), is_banner) for p in executed) > 0, (
        "the smoke run shows no banner: the banner check above tested nothing"
    )


def local_file(url: str) -> Path | None:
    parsed = urlparse(url)
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else None


@pytest.mark.slow
@pytest.mark.browser
def test_book_in_chromium(smoke_book, chromium, tmp_path):  # noqa: F811
    from playwright import sync_api

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "book_failure.png").unlink(missing_ok=True)  # only a failure of this run leaves one
    index = smoke_book["index"]
    lessons = [smoke_book["out"] / (p.stem + ".html") for p in smoke_book["executed"]]
    docs = sorted(set(smoke_book["out"].glob("*.html")) - set(lessons) - {index})
    assert smoke_book["out"] / "glossary.html" in docs
    pages = [index, *lessons, *docs]
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1200, "height": 1400},
        )
        # offline, like a student's copy: only file: URLs load (the widget/require.js CDN scripts fail)
        context.route(
            "**/*",
            lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort(),
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(60_000)
        cdp = context.new_cdp_session(page)
        try:
            for target in pages:
                check_book_page(page, cdp, target, index, has_figures=target in lessons)
            click_through_the_book(page, index, [index, *lessons])
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / "book_failure.png"))
            raise
        finally:
            context.close()


def check_book_page(page, cdp, target: Path, index: Path, has_figures: bool) -> None:
    """One page of the book in the browser: a title, every figure loaded, every link inside the book
    resolving, Chinese drawn with a CJK font; a screenshot of the index."""
    page.goto(target.as_uri(), wait_until="load")
    assert page.title(), f"{target.name} has no title"
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    if has_figures:
        assert images, f"{target.name} shows no figure"
    assert all(done and width > 0 for done, width in images), f"{target.name}: a figure did not load {images}"
    # every link inside the book resolves to a page that exists (and to an element, for #anchors)
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    for href in hrefs:
        file = local_file(href)
        if file is None:
            continue  # an http(s) link in the lesson text
        assert file.is_file(), f"{target.name} links to {href}, which does not exist"
        fragment = urlparse(
            href
        ).fragment  # percent-encoded; nbconvert's heading ids are too, GitHub's are not
        if fragment and file == target:
            ids = {json.dumps(fragment), json.dumps(unquote(fragment), ensure_ascii=False)}
            assert page.locator(", ".join(f"[id={i}]" for i in ids)).count(), f"{target.name}: no #{fragment}"
    assert "index.html" in " ".join(hrefs) or target == index
    chinese_heading = page.locator("h1, h2").filter(has_text=re.compile(r"[\u4e00-\u9fff]")).count()
    if has_figures or target == index or chinese_heading:  # a page of English docs may have none
        assert_cjk_renders(page, cdp, target.name)
    if target == index:
        page.screenshot(path=str(ARTIFACTS / "book_index.png"))


def click_through_the_book(page, index: Path, pages: list[Path]) -> None:
    """The navigation works by clicking, too: index → lesson 1 → next → back to the index; the code
    cells fold."""
    page.goto(index.as_uri())
    page.locator("a", has_text=re.compile(r"^01")).first.click()
    page.wait_for_load_state()
    assert local_file(page.url) == pages[1]
    page.locator("nav.book-nav.top a.book-next").click()
    page.wait_for_load_state()
    assert local_file(page.url) == pages[2]
    page.screenshot(path=str(ARTIFACTS / "book_lesson.png"), full_page=False)
    details = page.locator("details.book-code").first
    assert details.get_attribute("open") is not None
    details.locator("summary").click()
    assert details.get_attribute("open") is None, "clicking the summary did not fold the code cell"
    page.locator("nav.book-nav.top a.book-home").click()
    page.wait_for_load_state()
    assert local_file(page.url) == index


def assert_cjk_renders(page, cdp, name: str) -> None:
    """No tofu: the page's own font for body text draws Chinese with a real CJK font (Chromium's list of
    the platform fonts used for the first Chinese heading), and its characters are not all the same box."""
    heading = page.locator("h1, h2").filter(has_text=re.compile(r"[\u4e00-\u9fff]")).first
    assert heading.count(), f"{name} has no Chinese heading"
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    heading.evaluate("e => e.setAttribute('data-book-probe', '1')")
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": "[data-book-probe]"})["nodeId"]
    fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    cjk = [
        f["familyName"]
        for f in fonts
        if re.search(r"CJK|Han|PingFang|YaHei|Hiragino|Heiti|WenQuanYi", f["familyName"], re.I)
    ]
    assert cjk, f"{name}: the Chinese heading is drawn with {fonts}, no CJK font (tofu boxes?)"
    # tofu boxes all look alike: two different Chinese characters drawn in the heading's font must give
    # different pixels, and neither may look like a character no font has
    same = heading.evaluate(
        """(e, chars) => {
        const family = getComputedStyle(e).fontFamily;
        const draw = (ch) => {
            const canvas = document.createElement('canvas');
            canvas.width = canvas.height = 64;
            const ctx = canvas.getContext('2d');
            ctx.font = `48px ${family}`;
            ctx.fillText(ch, 4, 52);
            return Array.from(ctx.getImageData(0, 0, 64, 64).data).join(',');
        };
        const [a, b, missing] = chars.map(draw);
        return {a_b: a === b, a_missing: a === missing, b_missing: b === missing, family};
    }""",
        [CJK_SAMPLE[0], CJK_SAMPLE[1], MISSING_GLYPHS[0]],
    )
    assert not (same["a_b"] or same["a_missing"] or same["b_missing"]), (
        f"{name}: Chinese characters are drawn as identical boxes in {same['family']} (tofu): {same}"
    )


# ------------------------------------------------------------------ pages the lessons link to; widgets
def lesson(path: Path, title: str, markdown: str, outputs=(), widgets=None) -> Path:
    nb = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {"widgets": widgets} if widgets else {},
        "cells": [
            {"cell_type": "markdown", "id": "a0", "metadata": {}, "source": f"# {title}\n\n{markdown}"},
            {
                "cell_type": "code",
                "id": "a1",
                "metadata": {},
                "execution_count": 1,
                "source": "x",
                "outputs": list(outputs),
            },
        ],
    }
    path.write_text(json.dumps(nb, ensure_ascii=False), encoding="utf-8")
    return path


def test_links_to_the_glossary_package_docs_and_lessons_become_book_pages(tmp_path):
    repo, src = tmp_path / "repo", tmp_path / "src"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "course_utils").mkdir()
    src.mkdir()
    (repo / "notebooks" / "glossary.md").write_text(
        "# 术语表 (glossary)\n\n| 术语 | 含义 |\n|---|---|\n"
        "| 轮 (epoch) | 见 [代码](../course_utils/train.py)、"
        "[包的文档](../course_utils/README.md#bf16-or-fp32-on-the-cpu) |\n",
        encoding="utf-8",
    )
    (repo / "course_utils" / "train.py").write_text("# the lesson's loop\n", encoding="utf-8")
    (repo / "course_utils" / "README.md").write_text(
        "# `course_utils`\n\n## 学生阅读顺序 (Reading order)\n\n## bf16 or fp32 on the CPU\n\ntext\n",
        encoding="utf-8",
    )
    links = (
        "[术语表](glossary.md)、[Devices](../course_utils/README.md#bf16-or-fp32-on-the-cpu)、"
        "[下一课](02_b.ipynb#x)"
    )
    lesson(src / "01_a.ipynb", "01 · a", links)
    lesson(src / "02_b.ipynb", "02 · b", "[没有的文件](missing.md)")
    index = book.build_book(src, tmp_path / "book", repo / "notebooks")
    out = index.parent
    page = (out / "01_a.html").read_text(encoding="utf-8")
    assert 'href="glossary.html"' in page and 'href="02_b.html#x"' in page
    assert 'href="course_utils-README.html#bf16-or-fp32-on-the-cpu"' in page
    assert 'href="missing.md"' in (out / "02_b.html").read_text(encoding="utf-8")  # left for the link test
    glossary = (out / "glossary.html").read_text(encoding="utf-8")
    assert "<table>" in glossary and 'href="course_utils-README.html#bf16-or-fp32-on-the-cpu"' in glossary
    assert "代码" in glossary and "course_utils/train.py" not in glossary  # no page: its text, no link
    docs = (out / "course_utils-README.html").read_text(encoding="utf-8")
    assert 'id="bf16-or-fp32-on-the-cpu"' in docs and 'id="学生阅读顺序-reading-order"' in docs  # GitHub's
    assert 'href="glossary.html"' in index.read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == [
        "01_a.html",
        "02_b.html",
        "course_utils-README.html",
        "glossary.html",
        "index.html",
    ]


def test_the_instructor_panel_shows_as_its_saved_state_not_its_repr(tmp_path):
    """A book page has no kernel and (offline) no widget scripts: the panel is drawn from its saved state
    — its sliders where they were left, its schedule plot and table — and a widget without saved state
    says where to see it."""
    from ipywidgets.embed import embed_data
    from test_widgets import tiny_loaders

    from course_utils import models, widgets

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    panel = widgets.schedule_designer(
        models.resnet18_cbam(placement="stage"), *tiny_loaders(), epochs=(2, 3, 3)
    )
    panel.values = {"end1": 4}
    data = embed_data(views=[panel])
    widget_state = {"application/vnd.jupyter.widget-state+json": data["manager_state"]}
    view = {"application/vnd.jupyter.widget-view+json": data["view_specs"][0], "text/plain": [repr(panel)]}
    orphan = {"application/vnd.jupyter.widget-view+json": {"model_id": "gone"}, "text/plain": ["HBox()"]}
    outputs = [{"output_type": "display_data", "metadata": {}, "data": d} for d in (view, orphan)]
    lesson(tmp_path / "04_panel.ipynb", "04 · 面板", "讲师面板", outputs, widget_state)
    page = (book.build_book(tmp_path, tmp_path / "book").parent / "04_panel.html").read_text(encoding="utf-8")
    assert "ScheduleDesigner(" not in page and "HBox()" not in page
    assert "schedule-table" in page and "1-4" in page  # the preview table of the schedule as it was left
    assert page.count('type="range"') >= 2 and re.search(r'value="4"', page)  # the boundary slider, moved
    assert re.search(r'<img [^>]*src="data:image/png;base64,iVBOR', page)  # the learning-rate plot
    assert "在 JupyterLab 里运行" in page  # the widget whose state was not saved

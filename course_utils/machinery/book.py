"""``python -m course_utils book``: the executed course as a static HTML site (``output/book/``).

It reads the notebooks the last ``course`` run executed (papermill writes them to ``output/NN_*.ipynb``,
whatever the preset) and writes one page per lesson plus ``index.html``: the lessons in order with their
learning goals (from each notebook's first Markdown cell), preset and run time (papermill's
``metadata.papermill.duration``, else the sum of the cells' ``papermill.duration``), and on every page links
to the previous and next lesson and to the index. Every output is kept as the run left it — figures embedded
as ``data:`` URIs (a page is one self-contained file that can be mailed or published as is), the red
:func:`~course_utils.machinery.presets.banner` boxes as HTML — and each code cell sits in a ``<details>``
element (open by default; click its summary to fold it). Chinese text is set in a font stack that has the
glyphs
(Noto Sans CJK SC, Source Han Sans SC, PingFang SC, Hiragino Sans GB, Microsoft YaHei, then system-ui).

Why nbconvert's ``HTMLExporter`` (its ``lab`` template, with a few template blocks overridden) rather than a
book tool: it is the Jupyter project's own exporter, already installed with the Jupyter stack the course
needs, versioned with nbformat, and renders each output type exactly as JupyterLab does (it ships
JupyterLab's CSS), so the book shows what the students saw. jupyter-book would add a Sphinx or a Node.js
(MyST) tool chain, a configuration file and a table of contents to maintain for seven pages, and re-renders
outputs its own way; the one thing it adds — cross-page navigation and an index — is a few lines here.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO / "notebooks"  # the lessons' links (glossary.md, ../course_utils/README.md) start here
# a relative link (to a Markdown file, a notebook, any file of the repository): its path, #anchor, the rest
# of the tag and its text: href="glossary.md", "../course_utils/README.md#devices", "../course_utils/train.py"
RELATIVE_LINK = re.compile(
    r'<a href="(?![a-zA-Z][a-zA-Z0-9+.-]*:|#|/)([^"#]+)(#[^"]*)?"([^>]*)>(.*?)</a>', re.S
)
FONT_STACK = (
    '"Noto Sans CJK SC", "Source Han Sans SC", "PingFang SC", "Hiragino Sans GB", '
    '"Microsoft YaHei", system-ui, -apple-system, "Segoe UI", sans-serif'
)
CODE_FONT_STACK = (
    '"DejaVu Sans Mono", Menlo, Consolas, "Noto Sans Mono CJK SC", "Noto Sans CJK SC", '
    '"Microsoft YaHei", monospace'
)

CSS = f"""
:root {{ --jp-content-font-family: {FONT_STACK}; --jp-ui-font-family: {FONT_STACK};
         --jp-code-font-family: {CODE_FONT_STACK}; }}
body {{ font-family: {FONT_STACK}; }}
main, .book-index {{ max-width: 1100px; margin: 0 auto; }}
nav.book-nav {{ display: flex; justify-content: space-between; gap: 1em; max-width: 1100px;
               margin: 0.5em auto; padding: 0.5em 1em; border-bottom: 1px solid #ddd;
               font-family: {FONT_STACK}; }}
nav.book-nav.bottom {{ border-top: 1px solid #ddd; border-bottom: none; }}
nav.book-nav a {{ text-decoration: none; }}
details.book-code > summary {{ cursor: pointer; color: #555; font-size: 85%; padding: 2px 0 2px 1em;
                               font-family: {FONT_STACK}; }}
.book-index {{ padding: 1em; font-family: {FONT_STACK}; line-height: 1.6; }}
.book-index table {{ border-collapse: collapse; width: 100%; }}
.book-index td, .book-index th {{ border-bottom: 1px solid #ddd; padding: 0.6em; vertical-align: top;
                                   text-align: left; }}
.book-index .failed {{ color: #c00; font-weight: bold; }}
main.book-doc {{ padding: 0 1em; font-family: {FONT_STACK}; line-height: 1.6; }}
main.book-doc table {{ border-collapse: collapse; }}
main.book-doc td, main.book-doc th {{ border-bottom: 1px solid #ddd; padding: 0.4em 0.6em;
                                     text-align: left; }}
"""

# The lab template, with the book's CSS, navigation around the page and code cells in <details>.
TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{% block extra_css %}<style type="text/css">{{ resources.book_css }}</style>{% endblock extra_css %}
{%- block body_header -%}
{{ super() }}
{{ resources.book_nav_top }}
{%- endblock body_header -%}
{% block body_footer %}
{{ resources.book_nav_bottom }}
{{ super() }}
{% endblock body_footer %}
{% block input_group -%}
<details class="book-code" open><summary>代码 (code)</summary>
{{ super() }}
</details>
{%- endblock input_group %}
"""


NO_WIDGET_STATE = (
    '<p class="book-widget"><i>交互控件 (widget)：在 JupyterLab 里运行这个单元格才能看到。</i></p>'
)


class BookError(FileNotFoundError):
    """No executed notebooks to make a book of."""


def executed_notebooks(src_dir: str | Path = "output") -> list[Path]:
    """The executed lesson notebooks in ``src_dir`` (``NN_*.ipynb``, in order); a clear error if there are
    none."""
    src = Path(src_dir)
    found = sorted(src.glob(NOTEBOOK_GLOB))
    if not found:
        where = f"{src} has no executed notebooks (NN_*.ipynb)" if src.is_dir() else f"{src} does not exist"
        raise BookError(
            f"{where}: run `python -m course_utils course` first (it executes the notebooks into "
            f"output/), or point --src at the folder papermill wrote them to"
        )
    return found


def run_seconds(nb: dict) -> float | None:
    """papermill's run time of the notebook, else the sum of its cells' (``None`` if papermill did not run
    it)."""
    duration = nb.get("metadata", {}).get("papermill", {}).get("duration")
    if isinstance(duration, (int, float)):
        return float(duration)
    cells = [c.get("metadata", {}).get("papermill", {}).get("duration") for c in nb.get("cells", [])]
    cells = [d for d in cells if isinstance(d, (int, float))]
    return float(sum(cells)) if cells else None


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def lesson_summary(nb: dict, path: Path) -> dict:
    """Title, learning goals (Markdown), preset, run time and failure of one executed notebook."""
    first = next((c for c in nb.get("cells", []) if c.get("cell_type") == "markdown"), None)
    source = "".join(first["source"]) if first else ""
    title = next(
        (line.lstrip("#").strip() for line in source.splitlines() if line.startswith("#")), path.stem
    )
    # the goals: the section headed "学习目标" (learning objectives), else the first paragraph after the title
    match = re.search(
        r"^#+[^\n]*(学习目标|learning objectives|goals)[^\n]*\n(.*?)(?=^#|\Z)", source, re.M | re.S | re.I
    )
    if match:
        goals = match.group(2).strip()
    else:
        paragraphs = [
            p.strip() for p in re.split(r"\n\s*\n", source) if p.strip() and not p.lstrip().startswith("#")
        ]
        goals = paragraphs[0] if paragraphs else ""
    papermill = nb.get("metadata", {}).get("papermill", {})
    failed = papermill.get("exception") or any(
        o.get("output_type") == "error" for c in nb.get("cells", []) for o in c.get("outputs", [])
    )
    preset = (papermill.get("parameters") or {}).get("PRESET")
    return {
        "title": title,
        "goals": goals,
        "seconds": run_seconds(nb),
        "preset": preset,
        "failed": bool(failed),
        "page": path.stem + ".html",
        "notebook": path.name,
    }


def _nav(lessons: list[dict], i: int, where: str) -> str:
    """The bar above or below lesson ``i``: the previous lesson, the contents, the next lesson."""
    prev = _link("book-prev", lessons[i - 1], "← {}") if i > 0 else "<span></span>"
    nxt = _link("book-next", lessons[i + 1], "{} →") if i + 1 < len(lessons) else "<span></span>"
    home = '<a class="book-home" href="index.html">目录 (contents)</a>'
    return f'<nav class="book-nav {where}">{prev}{home}{nxt}</nav>'


def _link(css_class: str, lesson: dict, text: str) -> str:
    page, title = html.escape(lesson["page"]), html.escape(lesson["title"])
    return f'<a class="{css_class}" href="{page}">{text.format(title)}</a>'


def _exporter():
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="lab", extra_loaders=[jinja2.DictLoader({"book.html.j2": TEMPLATE})]
    )
    if exporter.has_trait(
        "language_code"
    ):  # <html lang="zh-CN">: the browser picks Simplified Chinese glyphs
        exporter.language_code = "zh-CN"
    exporter.template_file = "book.html.j2"
    return exporter


def build_book(
    src_dir: str | Path = "output",
    out_dir: str | Path = "output/book",
    notebooks_dir: str | Path = NOTEBOOKS_DIR,
) -> Path:
    """Render the executed notebooks in ``src_dir`` into ``out_dir``; returns the path of ``index.html``.

    Only the book's own pages are written (``index.html``, one ``NN_*.html`` per notebook, and one page per
    Markdown file of the repository the lessons link to, such as the glossary); nothing else in ``out_dir``
    is touched. The lessons' relative links are read from ``notebooks_dir`` (the repository's notebooks).
    """
    paths = executed_notebooks(src_dir)
    out, notebooks_dir = Path(out_dir), Path(notebooks_dir)
    out.mkdir(parents=True, exist_ok=True)
    notebooks = [_read_notebook(path) for path in paths]
    lessons = [lesson_summary(nb, path) for nb, path in zip(notebooks, paths)]
    exporter = _exporter()
    docs = DocPages(notebooks_dir, out, {p.name: lesson["page"] for p, lesson in zip(paths, lessons)})
    for i, (nb, lesson) in enumerate(zip(notebooks, lessons)):
        resources = {
            "metadata": {"name": lesson["title"]},
            "book_css": CSS,
            "book_nav_top": _nav(lessons, i, "top"),
            "book_nav_bottom": _nav(lessons, i, "bottom"),
        }
        body, _ = exporter.from_notebook_node(without_live_widgets(nb), resources=resources)
        (out / lesson["page"]).write_text(docs.link(body), encoding="utf-8")
    glossary = notebooks_dir / "glossary.md"
    glossary_page = docs.page_for(glossary) if glossary.is_file() else None
    index_path = out / "index.html"
    index_path.write_text(docs.link(_index_page(lessons, glossary_page)), encoding="utf-8")
    return index_path


def _read_notebook(path: Path):
    """The notebook at ``path``; one nbformat cannot read is refused, naming the file."""
    import nbformat

    try:
        return nbformat.read(path, as_version=4)
    except Exception as err:  # noqa: BLE001 - name the file whatever nbformat raised
        raise ValueError(
            f"{path} is not a readable notebook ({err}); run `python -m course_utils course` "
            f"again to re-execute it"
        ) from err


def without_live_widgets(nb):
    """``nb`` with each widget output drawn from the saved widget state as static HTML
    (:mod:`.widget_snapshot`): a book page cannot run a kernel, and the widgets' scripts come from a CDN
    that an offline copy cannot reach. The instructor's panel shows its controls as they were left, a
    progress bar as it ended; never a widget's text repr. A widget with no saved state shows a note."""
    import copy

    from .widget_snapshot import VIEW_KEY, render, saved_state

    nb = copy.deepcopy(nb)
    state = saved_state(nb)
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if VIEW_KEY in data:
                model_id = data[VIEW_KEY].get("model_id", "")
                output["data"] = {
                    "text/html": render(model_id, state) if model_id in state else NO_WIDGET_STATE
                }
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (so ``README.md#devices`` works there and in the book)."""
    text = heading.strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


class DocPages:
    """The repository's Markdown files that the lessons link to, each rendered once as a page of the book
    (``notebooks/glossary.md`` → ``glossary.html``, ``course_utils/README.md`` →
    ``course_utils-README.html``); links to executed notebooks point at their pages."""

    def __init__(self, notebooks_dir: Path, out: Path, lesson_pages: dict[str, str]):
        self.notebooks, self.out, self.lesson_pages = notebooks_dir, out, lesson_pages
        self.root = notebooks_dir.resolve().parent  # the repository
        self.pages: dict[Path, str] = {}

    def link(self, body: str, base: Path | None = None) -> str:
        """``body`` (a lesson's page, or a Markdown file's in ``base``) with its relative links pointing into
        the book: a Markdown file of the repository to its page, a notebook to its lesson; a link to another
        file of the repository (code, a script), which has no page in the book, keeps only its text. A link
        to nothing stays as it is (tests catch it)."""
        base = self.notebooks if base is None else base

        def point(match: re.Match) -> str:
            path, anchor, attributes, text = match.groups(default="")
            target = (base / html.unescape(path)).resolve()
            if target.suffix == ".ipynb" and target.name in self.lesson_pages:
                return f'<a href="{self.lesson_pages[target.name]}{anchor}"{attributes}>{text}</a>'
            if not (target.is_file() and self.root in target.parents) or target.suffix == ".html":
                return match.group(0)
            if target.suffix == ".md":
                return f'<a href="{self.page_for(target)}{anchor}"{attributes}>{text}</a>'
            return text

        return RELATIVE_LINK.sub(point, body)

    def page_for(self, path: Path) -> str:
        """The book page of the Markdown file ``path``, written the first time it is asked for."""
        path = path.resolve()
        if path not in self.pages:
            rel = path.relative_to(self.root).with_suffix("")
            parts = rel.parts[1:] if rel.parts[0] == "notebooks" else rel.parts
            self.pages[path] = "-".join(parts) + ".html"
            self._write(path)
        return self.pages[path]

    def _write(self, path: Path) -> None:
        from nbconvert.filters import markdown2html

        body = markdown2html(path.read_text(encoding="utf-8"))
        body = re.sub(
            r"<h([1-6]) id=\"[^\"]*\">(.*?)<a class=\"anchor-link\"[^>]*>[^<]*</a></h\1>", _heading, body
        )
        body = self.link(body, path.parent)
        title = re.sub(r"<[^>]+>", "", html.unescape(re.search(r"<h1[^>]*>(.*?)</h1>", body).group(1)))
        nav = '<nav class="book-nav top"><a class="book-home" href="index.html">目录 (contents)</a></nav>'
        (self.out / self.pages[path]).write_text(
            f"""<!DOCTYPE html>
<html lang="zh-CN">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{html.escape(title)}</title>
<style type="text/css">{CSS}</style></head>
<body>{nav}<main class="book-doc">{body}</main></body></html>
""",
            encoding="utf-8",
        )


def _heading(match: re.Match) -> str:
    level, inner = match.group(1), match.group(2)
    slug = github_slug(re.sub(r"<[^>]+>", "", html.unescape(inner)))
    return f'<h{level} id="{html.escape(slug)}">{inner}</h{level}>'


def _index_page(lessons: list[dict], glossary_page: str | None = None) -> str:
    """``index.html``: the lessons in order with their goals and run times, the presets, the total."""
    from nbconvert.filters import markdown2html

    total = sum(s for s in (lesson["seconds"] for lesson in lessons) if s is not None)
    presets = sorted({lesson["preset"] for lesson in lessons if lesson["preset"]})
    glossary = f' <a href="{glossary_page}">术语表 (glossary)</a>' if glossary_page else ""
    rows = []
    for lesson in lessons:
        status = ' <span class="failed">运行失败 (failed)</span>' if lesson["failed"] else ""
        rows.append(
            f'<tr><td><a href="{html.escape(lesson["page"])}">{html.escape(lesson["title"])}</a>{status}</td>'
            f"<td>{markdown2html(lesson['goals'])}</td><td>{format_seconds(lesson['seconds'])}</td></tr>"
        )
    return f"""<!DOCTYPE html>
<html lang="zh-CN">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>课程 (course): ResNet18 + CBAM 微调 CIFAR-10</title>
<style type="text/css">{CSS}</style></head>
<body><div class="book-index">
<h1>ResNet18 + CBAM 在 CIFAR-10 上的微调 (fine-tuning) · 已运行的课程 (executed course)</h1>
<p>{len(lessons)} 课 (lessons); 预设 (preset): {html.escape(", ".join(presets) or "–")};
总运行时间 (total run time): {format_seconds(total)}.{glossary}</p>
<table><thead><tr><th>课程 (lesson)</th><th>学习目标 (learning objectives)</th>
<th>运行时间 (run time)</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
</div></body></html>
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m course_utils book [--src output] [--out output/book]``."""
    parser = argparse.ArgumentParser(
        prog="python -m course_utils book",
        description="Render the executed notebooks of the last course run as a static HTML book.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--src", default="output", help="folder with the executed NN_*.ipynb (default: output)"
    )
    parser.add_argument(
        "--out", default="output/book", help="folder for the HTML pages (default: output/book)"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        index = build_book(args.src, args.out)
    except (BookError, ValueError) as err:
        print(f"book: {err}", file=sys.stderr)
        return 1
    print(f"book written to {index} (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

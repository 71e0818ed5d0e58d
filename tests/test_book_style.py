"""The book's house rules, checked on every chapter at once.

For each notebook in notebooks/: every cell has an id (nbformat 4.5), code lines fit the page
(79 characters), a code cell the reader sees fits a laptop's screen (MAX_LESSON_CELL lines; a
cell whose input is hidden is a figure, not a lesson), the prose speaks about
the engine and not about how the book was made (FORBIDDEN_PHRASES), links to other chapters point
at files that exist, and the chapter opens with its "# NN · Title" heading. The pages in book/
have their links checked too, and the roadmap figures must be what scripts/draw_roadmap.py draws.

Each test names every offending cell and line, so one run lists everything to fix."""
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BOOK_PAGES = sorted((ROOT / "book").glob("*.md"))

MAX_CODE_LINE = 79
MAX_LESSON_CELL = 65
# Cells read as one unit, longer than MAX_LESSON_CELL: (notebook, the name they define).
LONG_CELLS_ALLOWED = {
    # one Triton kernel; its pieces (_block_slots, _attend_block) are already
    # separate functions
    ("09_attention_kernels", "_decode_attention_kernel"),
}

# Words about how the book was produced, not about the engine. Case-sensitive where the word is
# only wrong in one spelling ("MISSED" as a verdict; "missed" is ordinary English).
FORBIDDEN_PHRASES = {
    "MISSED": re.compile(r"\bMISSED\b"),
    "LOG step": re.compile(r"\bLOG step"),
    "LOG.md step": re.compile(r"\bLOG\.md step"),
    "the seed": re.compile(r"\b[Tt]he seed\b"),
    "asked": re.compile(r"\b[Aa]sked\b"),
    "this session": re.compile(r"\b[Tt]his session\b"),
}

# [text](target) in markdown, not images; the target up to whitespace or ")".
MARKDOWN_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
DOC_ROLE = re.compile(r"\{doc\}`(?:[^`<]*<)?([^`>]+)>?`")
CHAPTER_HEADING = re.compile(r"# (\d\d) · \S")
APPENDIX_HEADING = re.compile(r"# Appendix ([A-Z]) · \S")


def notebook_id(path):
    return path.stem


def cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell):
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def is_local(target):
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")


def broken_links(text, base):
    "Markdown links to local files that do not exist, relative to the directory `base`."
    broken = []
    for target in MARKDOWN_LINK.findall(text):
        if is_local(target):
            file = target.split("#")[0]
            if file and not (base / file).exists():
                broken.append(target)
    return broken


def fail_with(problems, what):
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_code_lines_fit_the_page(path):
    problems = []
    for number, cell in enumerate(cells(path)):
        if cell["cell_type"] != "code":
            continue
        for line_number, line in enumerate(source(cell).splitlines(), 1):
            if len(line) > MAX_CODE_LINE:
                problems.append(f"{path.name} cell {number} line {line_number}: {len(line)} "
                                f"characters: {line.strip()[:60]}...")
    fail_with(problems, f"code lines longer than {MAX_CODE_LINE} characters")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_every_cell_has_an_id(path):
    missing = [str(number) for number, cell in enumerate(cells(path)) if "id" not in cell]
    fail_with(missing and [f"{path.name} cells {', '.join(missing)}"], "notebooks with cells lacking an id")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_lesson_cells_fit_the_screen(path):
    problems = []
    for number, cell in enumerate(cells(path)):
        if cell["cell_type"] != "code" or "hide-input" in cell["metadata"].get("tags", []):
            continue
        text = source(cell)
        lines = len(text.splitlines())
        defines = re.search(r"^(?:def|class) (\w+)", text, re.M)
        name = defines.group(1) if defines else ""
        if lines > MAX_LESSON_CELL and (path.stem, name) not in LONG_CELLS_ALLOWED:
            problems.append(f"{path.name} cell {number}: {lines} lines ({name or text.splitlines()[0][:40]})")
    fail_with(problems, f"code cells longer than {MAX_LESSON_CELL} lines")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_prose_speaks_about_the_engine(path):
    problems = []
    for number, cell in enumerate(cells(path)):
        if cell["cell_type"] != "markdown":
            continue
        for line_number, line in enumerate(source(cell).splitlines(), 1):
            for phrase, pattern in FORBIDDEN_PHRASES.items():
                if pattern.search(line):
                    problems.append(f"{path.name} cell {number} line {line_number}: "
                                    f"{phrase!r} in: {line.strip()[:70]}")
    fail_with(problems, "lines that talk about how the book was made")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_links_to_chapters_exist(path):
    problems = []
    for number, cell in enumerate(cells(path)):
        if cell["cell_type"] != "markdown":
            continue
        for line_number, line in enumerate(source(cell).splitlines(), 1):
            for target in broken_links(line, path.parent):
                if target.split("#")[0].endswith(".ipynb"):
                    problems.append(f"{path.name} cell {number} line {line_number}: "
                                    f"{target} does not exist")
    fail_with(problems, "links to notebooks that do not exist")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_chapter_opens_with_its_heading(path):
    markdown = [source(c) for c in cells(path) if c["cell_type"] == "markdown"]
    first_line = markdown[0].lstrip().splitlines()[0] if markdown else "(no markdown cell)"
    number = path.stem.split("_")[0]
    if number.isdigit():
        match = CHAPTER_HEADING.match(first_line)
        expected = f"# {number} · Title"
        ok = match is not None and match.group(1) == number
    else:  # appendix_a_tiny_model: "# Appendix A · Title"
        letter = path.stem.split("_")[1].upper()
        match = APPENDIX_HEADING.match(first_line)
        expected = f"# Appendix {letter} · Title"
        ok = match is not None and match.group(1) == letter
    if not ok:
        pytest.fail(f"{path.name}: the first markdown cell starts with {first_line[:60]!r}, "
                    f"not {expected!r}", pytrace=False)


@pytest.mark.parametrize("path", BOOK_PAGES, ids=lambda p: p.name)
def test_book_page_links_exist(path):
    problems = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for target in broken_links(line, path.parent):
            problems.append(f"{path.name} line {line_number}: {target} does not exist")
        for target in DOC_ROLE.findall(line):
            document = path.parent / target
            if not any(document.with_name(document.name + s).exists() for s in (".md", ".ipynb")):
                problems.append(f"{path.name} line {line_number}: {{doc}} {target} has no "
                                f".md or .ipynb")
        for phrase, pattern in FORBIDDEN_PHRASES.items():
            if pattern.search(line):
                problems.append(f"{path.name} line {line_number}: {phrase!r} in: "
                                f"{line.strip()[:70]}")
    fail_with(problems, "problems in the book's pages")


def test_every_chapter_is_in_the_table_of_contents():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text(encoding="utf-8"))
    listed = {entry["file"] for part in toc["parts"] for entry in part["chapters"]}
    missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.stem}" not in listed]
    fail_with(missing, "notebooks missing from book/_toc.yml (the book would leave them out)")


def load_roadmap_script():
    script = ROOT / "scripts" / "draw_roadmap.py"
    spec = importlib.util.spec_from_file_location("draw_roadmap", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_chapter_has_a_roadmap_box():
    numbers = {chapter.number for chapter in load_roadmap_script().CHAPTERS}
    missing = [p.name for p in NOTEBOOKS if p.stem[:2].isdigit() and p.stem[:2] not in numbers]
    fail_with(missing, "chapters without a box in scripts/draw_roadmap.py's CHAPTERS")


def test_roadmap_figures_are_up_to_date(tmp_path):
    load_roadmap_script().main(["--out", str(tmp_path)])
    committed = ROOT / "book" / "figures"
    drawn = {p.name for p in tmp_path.glob("roadmap*.svg")}
    stored = {p.name for p in committed.glob("roadmap*.svg")}
    problems = [f"{name}: not in book/figures" for name in sorted(drawn - stored)]
    problems += [f"{name}: no chapter draws it any more" for name in sorted(stored - drawn)]
    problems += [f"{name}: differs from what the script draws" for name in sorted(drawn & stored)
                 if (tmp_path / name).read_bytes() != (committed / name).read_bytes()]
    fail_with(problems, "stale roadmap figures (run `python scripts/draw_roadmap.py`)")

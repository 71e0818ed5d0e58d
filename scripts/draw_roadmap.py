#!/usr/bin/env python
"""Draw the book's roadmap: the engine as one pipeline, chapter by chapter, as SVG.

    python scripts/draw_roadmap.py             # write book/figures/roadmap*.svg
    python scripts/draw_roadmap.py --out DIR   # write them somewhere else (the test compares)

It writes
- `roadmap.svg`: the whole pipeline, grouped by part, for the book's introduction. It is 690 px
  wide, the width of the book's text column, and every label is at least 15 px there (10.5 pt at
  the 93% the page shows it at);
- `roadmap_NN.svg` for every chapter NN: the same pipeline as a strip of numbered boxes (7 x 1.2
  in), with chapter NN's box opened to its title and marked "you are here", for the chapter's
  first cell: `![...](../book/figures/roadmap_NN.svg)`.

The SVG is written by hand, not by matplotlib, so the files are small, their text stays text, and
the same input gives the same bytes on every machine (tests/test_book_style.py regenerates them
and compares). Text is sized for DejaVu Sans, the widest of the fonts the files ask for: with
matplotlib installed the script measures every label with it and refuses one that overflows its
box.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "book" / "figures"

FONT = "Helvetica, Arial, 'DejaVu Sans', sans-serif"
TEXT = "#1a1a1a"
ARROW = "#555555"
LABEL_PX = 15  # the smallest text: 10.5 pt even when the page shrinks the drawing by 7%


@dataclass(frozen=True)
class Part:
    number: str   # "I"
    title: str    # what the part does
    ink: str      # border, part label, highlighted box (white text on it: contrast >= 4.5)
    fill: str     # the boxes' background


@dataclass(frozen=True)
class Chapter:
    number: str             # "03"
    part: Part
    lines: tuple[str, ...]  # what it builds, in up to three short lines
    title: str              # the same in words, for the figure's description


PART_I = Part("I", "Building the model on many ranks", "#0b609a", "#deedf8")
PART_II = Part("II", "Making it fast", "#a84a0a", "#fbe6d6")
PART_III = Part("III", "Serving", "#00755a", "#d7f1e8")
PARTS = (PART_I, PART_II, PART_III)

CHAPTERS = (
    Chapter("00", PART_I, ("config &", "the machine"), "the model's config and the machine"),
    Chapter("01", PART_I, ("ranks &", "groups"), "ranks and process groups"),
    Chapter("02", PART_I, ("parallel", "linear"), "column- and row-parallel linear layers"),
    Chapter("03", PART_I, ("attention", "& paged", "KV cache"), "attention and the paged KV cache"),
    Chapter("04", PART_I, ("router",), "the router"),
    Chapter("05", PART_I, ("all-to-all", "experts"), "experts reached by all-to-all"),
    Chapter("06", PART_I, ("loader",), "the checkpoint loader"),
    Chapter("07", PART_I, ("model &", "runner"), "the model and its runner"),
    Chapter("08", PART_I, ("launcher",), "the launcher"),
    Chapter("09", PART_II, ("attention", "kernels"), "attention kernels"),
    Chapter("10", PART_II, ("MoE", "kernels"), "MoE kernels"),
    Chapter("11", PART_II, ("all-reduce",), "small all-reduces"),
    Chapter("12", PART_II, ("fast ops &", "CUDA graphs"), "fast operations and CUDA graphs"),
    Chapter("13", PART_II, ("layouts &", "results"), "layouts and results"),
    Chapter("14", PART_III, ("runtime &", "batching"), "the runtime and continuous batching"),
    Chapter("15", PART_III, ("prefix cache", "& chunked", "prefill"),
            "the prefix cache and chunked prefill"),
    Chapter("16", PART_III, ("server",), "the server"),
)


# ---------------------------------------------------------------------------------------------
# SVG pieces. Coordinates are rounded to 0.1 px so the output does not depend on float printing.

def num(x: float) -> str:
    text = f"{x:.1f}"
    return text[:-2] if text.endswith(".0") else text


def text(x, y, content, size=LABEL_PX, weight="normal", fill=TEXT, anchor="middle"):
    bold = ' font-weight="bold"' if weight == "bold" else ""
    return (f'<text x="{num(x)}" y="{num(y)}" font-size="{size}"{bold} fill="{fill}" '
            f'text-anchor="{anchor}">{escape(content)}</text>')


def rect(x, y, w, h, fill, stroke, radius=6, width=1.5):
    return (f'<rect x="{num(x)}" y="{num(y)}" width="{num(w)}" height="{num(h)}" '
            f'rx="{radius}" fill="{fill}" stroke="{stroke}" stroke-width="{width}"/>')


def path(points, arrow=True, color=ARROW, width=1.5):
    d = "M " + " L ".join(f"{num(x)} {num(y)}" for x, y in points)
    head = ' marker-end="url(#arrowhead)"' if arrow else ""
    return f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{width}"{head}/>'


def document(width, height, title, description, body):
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{num(width)}" height="{num(height)}" '
        f'viewBox="0 0 {num(width)} {num(height)}" role="img" font-family="{FONT}">',
        f"<title>{escape(title)}</title>",
        f"<desc>{escape(description)}</desc>",
        "<defs>",
        '<marker id="arrowhead" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
        f'fill="{ARROW}"/></marker>',
        "</defs>",
        *body,
        "</svg>",
        "",
    ])


def describe():
    parts = []
    for part in PARTS:
        steps = ", ".join(f"{c.number} {c.title}" for c in CHAPTERS if c.part is part)
        parts.append(f"Part {part.number}, {part.title}: {steps}.")
    return "The engine as one pipeline, chapter by chapter. " + " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Text widths: every label must fit its box in DejaVu Sans (wider than Helvetica and Arial).

@dataclass(frozen=True)
class Label:
    content: str
    size: float
    bold: bool
    room: float   # the width it must fit in
    where: str    # for the error message


def check_fit(labels):
    try:
        from matplotlib.font_manager import FontProperties
        from matplotlib.textpath import TextToPath
    except ImportError:  # the drawing does not depend on it; only the check does
        return
    measure = TextToPath()
    overflowing = []
    for label in labels:
        prop = FontProperties(family="DejaVu Sans", size=label.size,
                              weight="bold" if label.bold else "normal")
        width, _, _ = measure.get_text_width_height_descent(label.content, prop, ismath=False)
        # TextToPath works in points at 72 dpi; SVG sizes are px, so the two scales agree.
        if width > label.room:
            overflowing.append(f"{label.where}: {label.content!r} is {width:.1f} px wide, "
                               f"its box has room for {label.room:.1f}")
    if overflowing:
        sys.exit("draw_roadmap.py: labels do not fit:\n  " + "\n  ".join(overflowing))


# ---------------------------------------------------------------------------------------------
# The whole pipeline: one band per part, five boxes to a row, rows joined by arrows.

WIDTH = 690
GUTTER = 22              # left of the bands: the arrows from one part to the next run here
BAND_PAD = 10
COLUMNS = 5
ARROW_GAP = 23.5         # between boxes of a row: room for an arrow
BOX_H = 80
ROW_GAP = 30             # between two rows of one part: room for the arrow that wraps
BAND_HEAD = 30           # the part's label above its first row
BAND_GAP = 26            # between parts
LINE = 18                # baseline to baseline
ROWS_OF = {"I": [CHAPTERS[0:5], CHAPTERS[5:9]], "II": [CHAPTERS[9:14]],
           "III": [CHAPTERS[14:17]]}


def box_width():
    inner = WIDTH - GUTTER - 8 - 2 * BAND_PAD
    return (inner - (COLUMNS - 1) * ARROW_GAP) / COLUMNS


def draw_whole():
    w = box_width()
    left = GUTTER + BAND_PAD
    body, labels, boxes = [], [], []   # boxes: (chapter, x, y) in pipeline order
    y = 8
    for part in PARTS:
        rows = ROWS_OF[part.number]
        band_h = BAND_HEAD + len(rows) * BOX_H + (len(rows) - 1) * ROW_GAP + 12
        body.append(rect(GUTTER, y, WIDTH - GUTTER - 8, band_h, "#ffffff", part.ink,
                         radius=10, width=1.2))
        caption = f"Part {part.number} · {part.title}"
        body.append(text(left, y + 20, caption, size=16, weight="bold", fill=part.ink,
                         anchor="start"))
        labels.append(Label(caption, 16, True, WIDTH - 8 - BAND_PAD - left, "part label"))
        row_y = y + BAND_HEAD
        for row in rows:
            for column, chapter in enumerate(row):
                boxes.append((chapter, left + column * (w + ARROW_GAP), row_y))
            row_y += BOX_H + ROW_GAP
        y += band_h + BAND_GAP
    height = y - BAND_GAP + 8

    # Arrows first, so that boxes sit on top of them.
    for (a, ax, ay), (b, bx, by) in zip(boxes, boxes[1:]):
        if by == ay:    # the next box of the same row
            body.append(path([(ax + w, ay + BOX_H / 2), (bx - 1, by + BOX_H / 2)]))
        else:           # wrap: down below the row, left along the gutter, into the next box
            below = ay + BOX_H + (ROW_GAP / 2 if a.part is b.part else 12 + BAND_GAP / 2)
            body.append(path([(ax + w / 2, ay + BOX_H), (ax + w / 2, below),
                              (GUTTER / 2, below), (GUTTER / 2, by + BOX_H / 2),
                              (bx - 1, by + BOX_H / 2)]))
    for chapter, x, y in boxes:
        body.append(rect(x, y, w, BOX_H, chapter.part.fill, chapter.part.ink))
        lines = [(chapter.number, 16, True)] + [(line, LABEL_PX, False) for line in chapter.lines]
        top = y + BOX_H / 2 - LINE * len(lines) / 2 + LINE - 4   # the block centred
        for i, (content, size, bold) in enumerate(lines):
            body.append(text(x + w / 2, top + i * LINE, content, size=size,
                             weight="bold" if bold else "normal",
                             fill=chapter.part.ink if bold else TEXT))
            labels.append(Label(content, size, bold, w - 8, f"box {chapter.number}"))
    check_fit(labels)
    return document(WIDTH, height, "Roadmap of the book", describe(), body)


# ---------------------------------------------------------------------------------------------
# One chapter's strip: every chapter a numbered box, this one opened and marked.

STRIP_W = 672            # 7 in at 96 px per inch
SMALL_W = 26
OPEN_W = 168
STEP_GAP = 3
PART_GAP = 12
STRIP_BOX_Y, STRIP_BOX_H = 28, 48


def draw_strip(here: Chapter):
    widths = [OPEN_W if c is here else SMALL_W for c in CHAPTERS]
    gaps = [PART_GAP if a.part is not b.part else STEP_GAP for a, b in zip(CHAPTERS, CHAPTERS[1:])]
    x = 4
    xs = []
    for width, gap in zip(widths, gaps + [0]):
        xs.append(x)
        x += width + gap
    rail_end = xs[-1] + widths[-1] + 9
    if rail_end > STRIP_W - 2:
        sys.exit(f"draw_roadmap.py: the strip needs {rail_end + 2:.0f} px, more than {STRIP_W}")
    mid_y = STRIP_BOX_Y + STRIP_BOX_H / 2
    body, labels = [], []
    # The pipeline's rail behind the boxes, ending in an arrow.
    body.append(path([(xs[0], mid_y), (rail_end, mid_y)]))
    for part in PARTS:
        members = [i for i, c in enumerate(CHAPTERS) if c.part is part]
        start, end = xs[members[0]], xs[members[-1]] + widths[members[-1]]
        body.append(text(start, 16, f"Part {part.number}", weight="bold", fill=part.ink,
                         anchor="start"))
        body.append(path([(start, 21), (end, 21)], arrow=False, color=part.ink, width=2))
        labels.append(Label(f"Part {part.number}", LABEL_PX, True, end - start, "part label"))
    for chapter, x, width in zip(CHAPTERS, xs, widths):
        part = chapter.part
        if chapter is not here:
            body.append(rect(x, STRIP_BOX_Y, width, STRIP_BOX_H, part.fill, part.ink, radius=4,
                             width=1.2))
            body.append(text(x + width / 2, mid_y + 5, chapter.number, fill=TEXT))
            labels.append(Label(chapter.number, LABEL_PX, False, width - 2,
                                f"box {chapter.number}"))
            continue
        body.append(rect(x, STRIP_BOX_Y, width, STRIP_BOX_H, part.ink, part.ink, radius=4))
        lines = [f"{chapter.number} · {chapter.lines[0]}", " ".join(chapter.lines[1:])]
        lines = [line for line in lines if line]
        top = mid_y - LINE * len(lines) / 2 + LINE - 4
        for i, line in enumerate(lines):
            body.append(text(x + width / 2, top + i * LINE, line, weight="bold", fill="#ffffff"))
            labels.append(Label(line, LABEL_PX, True, width - 8, f"open box {chapter.number}"))
        # "you are here": a triangle under the box, and the words under it, kept on the canvas.
        centre = x + width / 2
        tip = STRIP_BOX_Y + STRIP_BOX_H + 4
        body.append(f'<path d="M {num(centre)} {num(tip)} L {num(centre - 7)} {num(tip + 10)} '
                    f'L {num(centre + 7)} {num(tip + 10)} z" fill="{part.ink}"/>')
        words_w = 112   # "you are here" in bold 15 px DejaVu Sans, rounded up (checked below)
        words_x = min(max(centre, 4 + words_w / 2), STRIP_W - 4 - words_w / 2)
        body.append(text(words_x, tip + 28, "you are here", weight="bold", fill=part.ink))
        labels.append(Label("you are here", LABEL_PX, True, words_w, "marker"))
    check_fit(labels)
    title = f"Roadmap: chapter {here.number}, {here.title}"
    description = (f"Chapter {here.number} ({here.title}, Part {here.part.number}) highlighted "
                   f"in the book's pipeline. " + describe())
    return document(STRIP_W, 114, title, description, body)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIGURES,
                        help="directory for the SVG files (default: book/figures)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    files = {"roadmap.svg": draw_whole()}
    for chapter in CHAPTERS:
        files[f"roadmap_{chapter.number}.svg"] = draw_strip(chapter)
    for name, svg in files.items():
        (args.out / name).write_text(svg, encoding="utf-8")
    print(f"draw_roadmap.py: wrote {len(files)} files to {args.out}")


if __name__ == "__main__":
    main()

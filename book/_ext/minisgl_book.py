"""Sphinx tweaks for the Mini-SGL book (loaded through `local_extensions` in book/_config.yml).

1. A chapter's `#| default_exp` cell holds a string literal, the module's docstring (scripts/export.py
   reads it). Jupyter echoes that string as the cell's value; on the page the echo only repeats the
   cell, so the rendered book drops it. Notebooks and the package are untouched.
2. static/minisgl.css: a wider article for the code cells, no duplicate search bar, and the
   measurement log's table fitted to the page."""
from pathlib import Path

from docutils import nodes


def drop_docstring_echo(app, doctree):
    for cell in list(doctree.findall(nodes.container)):
        if cell.get("nb_element") != "cell_code":
            continue
        source = next(cell.findall(nodes.literal_block), None)
        if source is not None and source.astext().lstrip().startswith("#| default_exp"):
            for child in list(cell.children):
                if child.get("nb_element") == "cell_code_output":
                    cell.remove(child)


def add_static_path(app, config):
    config.html_static_path.append(str(Path(__file__).parent / "static"))


def setup(app):
    app.connect("doctree-read", drop_docstring_echo)
    app.connect("config-inited", add_static_path)
    app.add_css_file("minisgl.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}

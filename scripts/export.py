#!/usr/bin/env python
"""Regenerate the `minisgl` package from the notebooks, or check that the two agree.

    python scripts/export.py            # write minisgl/ from notebooks/*.ipynb
    python scripts/export.py --check    # exit 1, naming the files, if minisgl/ is not what the notebooks export
    python scripts/export.py notebooks/03_sharded_attention.ipynb   # only that chapter's modules

The notebooks are the source of truth. Cells marked `#| export` go to the module named by the
`#| default_exp` cell above them, through nbdev's exporter (ModuleMaker): each module starts with
a header naming its notebook, and each block with a `# %% notebook #cell-id` line pointing back to
its cell. One difference from `nbdev_export`: a chapter may hold several `#| default_exp` cells
(chapter 03 builds the norm, the rotary embedding and attention), each starting a new module, and
the string literal in that cell becomes the module's docstring.
"""
import argparse
import ast
import filecmp
import re
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

from nbdev.export import ExportModuleProc
from nbdev.maker import ModuleMaker
from nbdev.process import NBProcessor

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "minisgl"

# Package __init__ files: generated here, so the package holds nothing a notebook did not write.
PACKAGE_DOCS = {
    "": "Mini-SGL: a small, fast Mixture-of-Experts inference engine for Qwen3-30B-A3B with tensor and "
        "expert parallelism.\n\nEvery module is generated from a chapter of the book in notebooks/; edit the "
        "notebook, then run `python scripts/export.py`.",
    "layers": "Tensor-parallel building blocks: linear layers, the dense MLP, norms, rotary, attention, vocab.",
    "moe": "The Mixture-of-Experts block: router (gate), AllToAll dispatch and combine, grouped experts.",
    "kernels": "Fused GPU kernels (Triton) and their plain PyTorch references.",
    "runtime": "The serving runtime: requests, the page pool, the prefix cache, the scheduler and the engine.",
    "server": "The OpenAI-compatible HTTP server: protocol, rank 0's front end, the serving loop, the command line.",
}


# The package's front door, `from minisgl import LLM, SamplingParams`, imported on first use so that
# `import minisgl.config` does not load the whole engine.
_LAZY_API = '''
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    if name == "LLM":
        from minisgl.llm import LLM
        return LLM
    if name == "SamplingParams":
        from minisgl.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'minisgl' has no attribute {name!r}")
'''


class ChapterExport(ExportModuleProc):
    "nbdev's export processor, except that every `#| default_exp` cell starts a module of its own."

    def begin(self):
        super().begin()
        self.default_exp, self.docstrings, self.classes = None, {}, {}

    def _default_exp_(self, cell, exp_to):
        self.default_exp = exp_to
        body = [line for line in cell.source.splitlines() if not line.startswith("#|")]
        tree = ast.parse("\n".join(body))
        if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
            self.docstrings[exp_to] = tree.body[0].value.value

    def _exporti_(self, cell, exp_to=None):
        if self._add_to_class(cell):
            return
        self.modules[exp_to or self.default_exp].append(cell)
        for name in re.findall(r"^class (\w+)", cell.source, re.MULTILINE):
            self.classes[name] = cell

    def _export_(self, cell, exp_to=None):
        if self._add_to_class(cell):
            return
        self._exporti_(cell, exp_to)
        self.in_all[exp_to or self.default_exp].append(cell)

    def _add_to_class(self, cell) -> bool:
        """A cell that opens with `@patch_to(SomeClass)` (fastcore's: in the notebook it adds the function
        below to a class defined in an earlier cell) goes into that class's body in the module, without the
        decorator: the chapter builds a class over several cells, the package gets one plain class."""
        lines = cell.source.splitlines()
        body = [line for line in lines if not line.startswith("#|")]
        while body and not body[0].strip():
            body.pop(0)
        match = re.fullmatch(r"@patch_to\((\w+)(?:, *(cls_method|as_prop)=True)?\)\s*", body[0]) if body else None
        if match is None:
            return False
        owner = self.classes.get(match.group(1))
        if owner is None:
            raise SystemExit(f"`@patch_to({match.group(1)})` before any exported `class {match.group(1)}`")
        # fastcore's cls_method=True / as_prop=True: a classmethod / property in the class body.
        decorator = {"cls_method": ["@classmethod"], "as_prop": ["@property"]}.get(match.group(2), [])
        method = "\n".join(("    " + line) if line.strip() else "" for line in decorator + body[1:])
        owner.source = owner.source.rstrip("\n") + "\n\n" + method.rstrip("\n")
        return True

    _exports_, _exportd_ = _export_, _exporti_

    def __call__(self, cell):
        pass  # markdown cells never go into modules


def export_notebook(notebook: Path, lib_path: Path) -> list[Path]:
    "Write the modules of one notebook under `lib_path`; return their paths."
    proc = ChapterExport()
    NBProcessor(notebook, [proc]).process()
    written = []
    for name, cells in proc.modules.items():
        if name is None:
            raise SystemExit(f"{notebook.name}: a cell is marked for export before any `#| default_exp` cell")
        maker = ModuleMaker(dest=lib_path, name=name, nb_path=notebook, is_new=True)
        maker.make(cells, proc.in_all[name], lib_path=lib_path)
        doc = proc.docstrings.get(name)
        if doc:
            maker.fname.write_text(f'"""{doc}"""\n\n' + maker.fname.read_text())
        written.append(maker.fname)
    return written


def export_all(root: Path) -> None:
    "Regenerate `root/minisgl` from `root/notebooks`."
    lib_path = root / PACKAGE
    if lib_path.exists():  # every module is regenerated; data files (checkpoints/) stay
        for path in sorted(lib_path.rglob("*.py"), reverse=True):
            path.unlink()
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        export_notebook(notebook, lib_path)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for sub, doc in PACKAGE_DOCS.items():
        folder = lib_path / sub
        if folder.is_dir():
            extra = f'\n__version__ = "{version}"\n{_LAZY_API}' if sub == "" else ""
            (folder / "__init__.py").write_text(f'"""{doc}"""\n{extra}')
    for folder in sorted(p for p in lib_path.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        if any(folder.glob("*.py")) and not (folder / "__init__.py").exists():
            raise SystemExit(f"{folder.relative_to(root)} has no docstring in PACKAGE_DOCS of scripts/export.py")


def python_files(lib_path: Path) -> set[Path]:
    return {p.relative_to(lib_path) for p in lib_path.rglob("*.py") if "__pycache__" not in p.parts}


def check() -> int:
    "0 if minisgl/ is exactly what the notebooks export; else 1, naming every file that differs."
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(ROOT / "notebooks", tmp / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        export_all(tmp)
        expected, actual = python_files(tmp / PACKAGE), python_files(ROOT / PACKAGE)
        problems = [f"{PACKAGE}/{p}: not exported by any notebook (delete it, or export it from one)"
                    for p in sorted(actual - expected)]
        problems += [f"{PACKAGE}/{p}: missing (run python scripts/export.py)" for p in sorted(expected - actual)]
        problems += [f"{PACKAGE}/{p}: differs from what its notebook exports (edit the notebook, then export)"
                     for p in sorted(expected & actual)
                     if not filecmp.cmp(tmp / PACKAGE / p, ROOT / PACKAGE / p, shallow=False)]
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("notebooks", nargs="*", type=Path, help="export only these (default: all)")
    args = parser.parse_args()
    if args.check:
        return check()
    if args.notebooks:
        for notebook in args.notebooks:
            export_notebook(notebook.resolve(), ROOT / PACKAGE)
    else:
        export_all(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())

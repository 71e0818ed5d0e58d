"""The package is generated from the notebooks: `scripts/export.py --check` passes on the repository,
and it catches a hand edit of a generated module, naming the file."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "scripts" / "export.py"), *args], cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_package_is_what_the_notebooks_export():
    result = export(ROOT, "--check")
    assert result.returncode == 0, f"minisgl/ differs from the notebooks:\n{result.stderr}"


def test_check_names_a_hand_edited_module(tmp_path):
    for folder in ("notebooks", "minisgl", "scripts"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    # Regenerate the copy so that the edit below is the only difference, whatever the repository's state.
    assert export(tmp_path).returncode == 0
    assert export(tmp_path, "--check").returncode == 0

    module = tmp_path / "minisgl" / "config.py"  # exported by chapter 00
    module.write_text(module.read_text() + "HAND_EDITED = True\n")
    result = export(tmp_path, "--check")
    assert result.returncode == 1
    assert "minisgl/config.py" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_class_built_over_several_cells_comes_out_as_one_class(tmp_path):
    "Cells that add methods with fastcore's `@patch_to(Cls)` go into the class body, without the decorator."
    import importlib.util
    import json
    cells = [("#| default_exp demo\n\"\"\"A demo module.\"\"\"", "a1"),
             ("#| export\nclass Counter:\n    \"Counts.\"\n\n    def __init__(self):\n        self.n = 0", "a2"),
             ("#| export\n@patch_to(Counter)\ndef add(self, k: int) -> int:\n    \"Add k.\"\n    self.n += k\n"
              "    return self.n", "a3"),
             ("#| export\ndef double(c: Counter) -> int:\n    return 2 * c.n", "a4")]
    notebook = {"cells": [{"cell_type": "code", "id": i, "metadata": {}, "source": s, "outputs": [],
                           "execution_count": None} for s, i in cells],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "notebooks").mkdir()
    path = tmp_path / "notebooks" / "99_demo.ipynb"
    path.write_text(json.dumps(notebook))
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    export_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_script)
    (module,) = export_script.export_notebook(path, tmp_path / "pkg")
    text = module.read_text()
    assert "patch_to" not in text and "    def add(self, k: int) -> int:" in text
    assert "__all__ = ['Counter', 'double']" in text
    spec = importlib.util.spec_from_file_location("demo", module)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    counter = demo.Counter()
    assert counter.add(3) == 3 and demo.double(counter) == 6

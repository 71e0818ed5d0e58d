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

#!/usr/bin/env bash
# Build the book into _build/html, with every Sphinx warning an error.
#
#   bash scripts/build_book.sh               # execute every notebook once, then render
#   bash scripts/build_book.sh --no-execute  # render the outputs already in notebooks/*.ipynb
#                                            # (CI: `pytest` with nbmake --overwrite wrote them)
#
# A notebook that raises fails the build (execute.raise_on_error in book/_config.yml).
set -euo pipefail
cd "$(dirname "$0")/.."

execute=1
for arg in "$@"; do
    case "$arg" in
        --no-execute) execute=0 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "build_book.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Check the table of contents before Sphinx does: every page exists, and with --no-execute every
# notebook has been executed (each non-empty code cell has an execution count).
python - "$execute" <<'EOF'
import json, sys
from pathlib import Path
import yaml

execute = sys.argv[1] == "1"
toc = yaml.safe_load(Path("book/_toc.yml").read_text())
files = [toc["root"]] + [ch["file"] for part in toc.get("parts", []) for ch in part.get("chapters", [])]
problems = []
for name in files:
    found = [Path(name + suffix) for suffix in (".md", ".ipynb") if Path(name + suffix).exists()]
    if not found:
        problems.append(f"{name}: listed in book/_toc.yml but there is no {name}.md or {name}.ipynb")
    elif found[0].suffix == ".ipynb" and not execute:
        cells = json.loads(found[0].read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip()]
        if code and any(c.get("execution_count") is None for c in code):
            problems.append(f"{found[0]}: not executed (run `PYTEST_ADDOPTS=--overwrite pytest notebooks` "
                            "first, or build without --no-execute)")
for line in problems:
    print("build_book.sh:", line, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

config=book/_config.yml
if [ "$execute" = 0 ]; then
    config="$tmp/_config.yml"
    python - book/_config.yml "$config" <<'EOF'
import sys
from pathlib import Path
import yaml
config = yaml.safe_load(open(sys.argv[1]))
config["execute"]["execute_notebooks"] = "off"
# local_extensions paths are relative to the config file, which now lives elsewhere.
local = config.get("sphinx", {}).get("local_extensions") or {}
for name, path in local.items():
    local[name] = str((Path(sys.argv[1]).parent / path).resolve())
yaml.safe_dump(config, open(sys.argv[2], "w"), sort_keys=False)
EOF
fi

jupyter-book build . --config "$config" --toc book/_toc.yml --path-output . \
    --builder html --warningiserror --nitpick --keep-going
echo "build_book.sh: open _build/html/index.html"

"""docs/design.md's file map is the picture a newcomer reads first: it names every module."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_design_file_map_names_every_module():
    text = (REPO / "docs" / "design.md").read_text()
    block = text.split("```", 2)[1]  # the tree, the document's first code block
    named = set(re.findall(r"[a-z_]+\.py", block))
    modules = {p.name for p in (REPO / "src" / "superweight").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert modules - named == set(), "modules missing from docs/design.md's file map"
    assert named - modules == set(), "docs/design.md's file map names modules that do not exist"

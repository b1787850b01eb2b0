"""Every document links only to documents inside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"\.\./shared|/work/|LOCAL-STACK\.md|STYLE\.md")


def documents() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    found = [ROOT / name for name in listed.stdout.split()]
    return [path for path in found if path.exists()]


def test_links_resolve_inside_the_repository() -> None:
    broken = []
    for doc in documents():
        text = doc.read_text()
        for target in LINK.findall(text):
            if re.match(r"^(https?:|mailto:|#)", target):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists() or ROOT not in path.parents:
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
        broken += [f"{doc.relative_to(ROOT)}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert len(documents()) >= 5
    assert broken == []

"""The README names real tests in its Guarantees section."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_the_guarantees_name_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\b(test_[a-z0-9_]+)\b", section))
    modules = {p.stem for p in (ROOT / "tests").rglob("test_*.py")}
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_[a-z0-9_]+)", path.read_text(), re.M))
    missing = sorted(named - modules - defined)
    assert not missing, f"README's Guarantees name tests that do not exist: {missing}"
    assert len(named & defined) >= 20

"""docs/architecture.md stays true to the tree: every file it names exists, and it names every
source file of the scheduler, the worker and the observatory, and every service port."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_architecture_names_existing_files_and_every_role_file():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:src|crates|polars-source)/[^`\s]+)`", text))
    assert named, "no file named"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    for role in ("scheduler", "worker", "observatory"):
        for path in sorted((ROOT / "src" / role).rglob("*.rs")):
            rel = str(path.relative_to(ROOT))
            if path.name != "mod.rs":
                assert rel in text, f"docs/architecture.md does not name {rel}"
    for port in ("5049", "5050", "5051", "5052", "5053", "3001"):
        assert f"| {port} |" in text, f"port {port} has no row"

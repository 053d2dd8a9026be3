"""The README is the front door: small, linking every page under docs/, and true about the shipped spaces."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_short_and_links_every_page_under_docs():
    assert len(README.encode()) < 15_000
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in README, page.name


def test_docs_name_no_internal_tracker():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert not re.search(r"\bissue #?\d+\b", page.read_text(encoding="utf-8"), re.I), page.name


@pytest.mark.parametrize("name", ["smoke", "cpu", "seed"])
def test_the_readme_describes_each_shipped_space_as_the_file_says(name):
    row = next(line for line in README.splitlines() if line.startswith(f"| `search_spaces/{name}.yaml`"))
    doc = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
    space = doc["space"]
    assert f"{doc['searcher']['num_samples']} trials" in row
    epochs = space["epochs"]
    if isinstance(epochs, dict):
        assert f"{epochs['low']}-{epochs['high']} epochs" in row or f"up to {epochs['high']} epochs" in row
    else:
        assert f"{epochs} epochs" in row
    size = space["image_size"]
    sizes = size["choices"] if isinstance(size, dict) else [size]
    assert (f"{sizes[0]} px" in row) if len(sizes) == 1 else (f"{min(sizes)}-{max(sizes)} px" in row)


def test_every_test_the_docs_name_exists():
    """The fault and security tables name the test that proves each row: a renamed or merged test must not
    leave a row pointing at nothing."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {m for page in pages for m in re.findall(r"(test_\w+\.py)::(test_\w+)", page.read_text(encoding="utf-8"))}
    assert len(named) > 20  # the tables were found
    for file, test in sorted(named):
        where = list((ROOT / "tests").rglob(file))  # tests/ mirrors the wings: a file name is unique in it
        assert len(where) == 1, (file, where)
        assert re.search(rf"^def {test}\(", where[0].read_text(encoding="utf-8"), re.M), (file, test)

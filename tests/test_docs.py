"""The documentation cites only what a reader of the repository can open: the project's own method document
(`nbs/method.ipynb`), never the team's internal documents, and every link into that document lands on a heading."""
import json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["nbs", "attnssl", "tests", "benchmarks", "README.md"]
SKIPPED_PARTS = {"reports", "__pycache__", ".ipynb_checkpoints"}
METHOD_NB = ROOT/"nbs"/"method.ipynb"

# Built from pieces so that this file does not match itself. A citation is the internal spec's name followed by
# a section number, possibly after a line break (also a line break inside a notebook's JSON source list), or
# the internal contracts file. The registry `attnssl.methods.METHODS` (no section number after it) is not one.
_SPEC, _CONTRACTS = "METH" + "ODS", "CONTR" + "ACTS" + r"\.md"
CITATION = re.compile(_SPEC + r'(?:\s|\\n|[",])*\d+(?:\.\d+)?\b|' + _CONTRACTS)

def _files():
    for name in SCANNED:
        p = ROOT/name
        if p.is_file(): yield p
        elif p.is_dir():
            yield from (f for f in sorted(p.rglob("*")) if f.is_file() and not SKIPPED_PARTS & set(f.relative_to(ROOT).parts))

def _text(p: Path) -> str | None:
    try: return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError): return None   # binary files (figures, caches) cite nothing

def test_no_internal_document_citations():
    found = []
    for p in _files():
        text = _text(p)
        if text is None: continue
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{p.relative_to(ROOT)}:{line}: {m.group(0)!r}")
    assert not found, ("internal documents cited; link to nbs/method.ipynb instead "
                       "(e.g. [method §4](method.ipynb#4-attention-guided-views)):\n" + "\n".join(found))

def test_citation_pattern():
    "The pattern catches a citation split over a line break and leaves the registry name alone."
    assert CITATION.search(_SPEC + " 1.4") and CITATION.search(_SPEC + "\n1.3") and CITATION.search(_SPEC + ' 1')
    assert CITATION.search(_SPEC + '\\n",\n    "1.3') and CITATION.search("see " + "CONTR" + "ACTS.md")
    assert not CITATION.search("from attnssl.methods import " + _SPEC + "\nfor name in " + _SPEC + ":")
    assert not CITATION.search("PAPER_" + _SPEC + "[\"byol\"]")

def github_anchor(heading: str) -> str:
    "GitHub's anchor of a markdown heading: tags dropped, lowercase, punctuation except '-' and '_' dropped, spaces -> '-'."
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")

def test_github_anchor():
    assert github_anchor("4. Attention-guided views") == "4-attention-guided-views"
    assert github_anchor("10. Recipes, data and evaluation") == "10-recipes-data-and-evaluation"
    assert github_anchor("E0. ViT configuration") == "e0-vit-configuration"

def _markdown(nb: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "markdown"]

def method_anchors() -> set[str]:
    heads = [m.group(1) for src in _markdown(METHOD_NB) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", src, re.M)]
    return {github_anchor(h) for h in heads}

def test_method_document():
    "A markdown-only notebook with a title and a summary, numbered sections and a reference list."
    assert METHOD_NB.exists()
    cells = json.loads(METHOD_NB.read_text())["cells"]
    assert cells and all(c["cell_type"] == "markdown" for c in cells), "the method document has no code cells"
    first = "".join(cells[0]["source"])
    assert first.startswith("# Method\n") and "\n> " in first
    anchors = method_anchors()
    assert {"1-the-thesis-and-its-claim", "4-attention-guided-views", "12-experiments", "17-references"} <= anchors
    # explicit `<a id>` anchors (for renderers whose heading ids differ from GitHub's) repeat the heading anchors
    ids = {m.group(1) for src in _markdown(METHOD_NB) for m in re.finditer(r'<a id="([^"]+)"></a>', src)}
    assert ids and ids <= anchors, sorted(ids - anchors)

def test_method_links_resolve():
    "Every `method.ipynb#anchor` in nbs/ (any cell) and every in-page `#anchor` link of the document names one of its headings."
    anchors, bad, n = method_anchors(), [], 0
    for nb in sorted((ROOT/"nbs").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in nb.parts: continue
        for m in re.finditer(r"method\.ipynb#([\w\-]+)", nb.read_text(encoding="utf-8")):
            n += 1
            if m.group(1) not in anchors: bad.append(f"{nb.relative_to(ROOT)}: #{m.group(1)}")
    for src in _markdown(METHOD_NB):
        for m in re.finditer(r"\]\(#([\w\-]+)\)", src):
            if m.group(1) not in anchors: bad.append(f"nbs/method.ipynb: #{m.group(1)}")
    assert n > 0, "no links into the method document found"
    assert not bad, "links to headings that nbs/method.ipynb does not have:\n" + "\n".join(bad)

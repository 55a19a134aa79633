"""The repository stands alone: no tracked file points outside it to the developers' shared folder, and
every `docs/method.md §N` a file cites is a section of docs/method.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Spelled so that this file does not match itself: the developers' shared folder beside the checkout,
# by relative or absolute path.
OUTSIDE = re.compile(r"\.\./shared\b|/work/share[d]\b")
# A citation: docs/method.md (possibly in backticks or brackets) followed by sections such as §3,
# "§3, §4", "§4-§6" or "§4–6".
CITATION = re.compile(r"docs/method\.md`?\)?\s*\(?\s*(§\s?\d+(?:\s*(?:[-–]|,|and)\s*§?\s?\d+)*)")
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "node_modules"}


def tracked_files() -> list[Path]:
    """Files under version control (`git ls-files`); without git, every file of the tree outside
    virtual environments, caches and build output."""
    git = shutil.which("git")
    if git is not None and (ROOT / ".git").exists():
        out = subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
        if out.returncode == 0:
            names = [n for n in out.stdout.decode("utf-8", "surrogateescape").split("\0") if n]
            return [ROOT / n for n in names if (ROOT / n).is_file()]
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and not any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            files.append(path)
    return files


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files cannot hold a path a reader would follow


def cited_sections(text: str) -> set[int]:
    """Section numbers cited as docs/method.md §N, ranges expanded."""
    out: set[int] = set()
    for match in CITATION.finditer(text):
        spec = match.group(1)
        for part in re.split(r"\s*(?:,|and)\s*", spec):
            numbers = [int(n) for n in re.findall(r"\d+", part)]
            if len(numbers) == 2:
                out.update(range(numbers[0], numbers[1] + 1))
            else:
                out.update(numbers)
    return out


def method_sections() -> set[int]:
    text = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.MULTILINE)}


def test_no_tracked_file_refers_to_the_shared_folder():
    files = tracked_files()
    assert any(f.name == "pyproject.toml" for f in files) and len(files) > 20  # the listing worked
    offending = []
    for path in files:
        text = read_text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE.search(line):
                offending.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offending, "files that point outside the repository:\n" + "\n".join(offending)


def test_the_check_sees_references():
    shared = "/shar" + "ed"  # not spelled out, so that this file passes its own check
    assert OUTSIDE.search(f"see ..{shared}/method.md §3") and OUTSIDE.search(f"/work{shared}/data/peap")
    assert not OUTSIDE.search("tokens shared by both prompts") and not OUTSIDE.search("docs/method.md")
    assert cited_sections("(docs/method.md §2, §4-§6)") == {2, 4, 5, 6}
    assert cited_sections("`docs/method.md` §8 and docs/method.md §3-§4") == {3, 4, 8}


def test_cited_method_sections_exist():
    sections = method_sections()
    assert set(range(1, 11)) <= sections, sorted(sections)
    cited: dict[int, list[str]] = {}
    for path in tracked_files():
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in ("src", "tests", "benchmarks", "docs") or rel == Path("docs/method.md"):
            continue
        text = read_text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            for n in cited_sections(line):
                cited.setdefault(n, []).append(f"{rel}:{lineno}")
    from_src = {n for n, places in cited.items() if any(p.startswith("src") for p in places)}
    assert len(from_src) >= 8, cited  # the docstrings do cite it
    missing = {n: places for n, places in cited.items() if n not in sections}
    assert not missing, f"docs/method.md has no section for these citations: {missing}"

"""The Dockerfile's build context installs the whole product.

There is no Docker daemon here, so the image itself is not built in the tests. What can go
wrong in it without anyone noticing is the context: a ``.dockerignore`` line that drops a
file ``pip install .`` needs, or a new package that the wheel leaves out. This builds the
wheel from exactly the context Docker would send and checks that it holds every module.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rayfleet", "engines", "serve_apps", "bench", "fleet", "autoscaling", "kvcache")

pytestmark = pytest.mark.timeout(240)


def _pattern(line: str) -> re.Pattern[str]:
    """A ``.dockerignore`` line as a regex over context-relative POSIX paths (Go's
    ``filepath.Match`` plus ``**``, as Docker reads it)."""
    if line.startswith("!"):
        raise AssertionError("exceptions (!) are not handled by this check; extend it before using them")
    parts = []
    for token in re.split(r"(\*\*/|\*|\?)", line.strip("/")):
        parts.append({"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token)))
    return re.compile("".join(parts))


def repository_files() -> list[str]:
    """The files of a clone (tracked or new, never git-ignored ones), context-relative."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    return [relative for relative in listed if (ROOT / relative).is_file()]


def build_context(tmp: Path) -> Path:
    """Copy the files Docker would send for ``docker build .`` into ``tmp``."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [_pattern(line) for line in lines if line.strip() and not line.startswith("#")]

    def ignored(relative: str) -> bool:
        prefixes = [relative] + ["/".join(relative.split("/")[:i]) for i in range(1, relative.count("/") + 1)]
        return any(p.fullmatch(prefix) for p in patterns for prefix in prefixes)

    context = tmp / "context"
    for relative in repository_files():
        if not ignored(relative):
            (context / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, context / relative)
    return context


def test_the_dockerfile_installs_the_package_from_its_build_context(tmp_path: Path) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY \. (\S+)$", dockerfile, re.M), "the image installs from the whole build context"
    assert "pip install --no-cache-dir /tmp/rayfleet-src" in dockerfile
    context = build_context(tmp_path)
    assert not (context / "tests").exists() and not (context / ".git").exists()

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"),
                    str(context)], check=True, capture_output=True, timeout=200)  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("rayfleet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    modules = {f for f in repository_files() if f.split("/")[0] in PACKAGES and f.endswith(".py")}
    assert modules and not modules - names, f"missing from the image: {sorted(modules - names)[:10]}"
    assert "rayfleet = rayfleet.cli:main" in entry_points

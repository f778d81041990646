"""The docs travel with the repository: links resolve, nothing points outside it, the CLI
reference matches the app, and text the tool shows cites only files an install has."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
# markdown links and images: [text](target) — not inside code spans or fenced blocks
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def _load_reference():
    spec = importlib.util.spec_from_file_location(
        "cli_reference", ROOT / "scripts/cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_docs_exist_and_readme_links_them():
    names = {p.name for p in DOCS}
    assert {"design.md", "cli.md", "formats.md", "maths.md"} <= names
    readme = _links(ROOT / "README.md")
    for name in ("design.md", "cli.md", "formats.md", "maths.md"):
        assert f"docs/{name}" in readme, f"README.md does not link docs/{name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(page: Path):
    bad = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_do_not_point_outside_the_repository(page: Path):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "/work/" not in text, page.name


def test_text_the_tool_shows_cites_only_installed_files():
    """Model cards ship with the package and `gmcurv head info` prints the head's: a line
    that sends the reader to repository-only files (bench/, tests/, scripts/, docs/) must
    say they are in the repository (an install does not have them)."""
    cards = [
        p
        for p in ROOT.rglob("sample_models/**/*.md")
        if ".git" not in p.parts and "build" not in p.parts
    ]
    assert cards
    repo_only = re.compile(r"(?<![\w./-])(bench|tests|scripts|docs|\.\./shared)/[\w./-]+")
    for card in cards:
        for line in card.read_text(encoding="utf-8").splitlines():
            hits = repo_only.findall(line)
            assert not hits or "repository" in line, (
                f"{card.relative_to(ROOT)} cites repository-only paths {hits}: {line.strip()}"
            )


def test_cli_reference_is_generated_from_the_app():
    ref = _load_reference()
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert ref.updated(text) == text, (
        "docs/cli.md's reference is stale: run python scripts/cli_reference.py"
    )


def test_cli_reference_names_every_command_and_option():
    ref = _load_reference()
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for path, command in ref.commands():
        assert f"`gmcurv {' '.join(path)}" in text, path
        for param in command.params:
            if getattr(param, "hidden", False):  # deprecated aliases
                continue
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("-"):
                    assert opt in text, (path, opt)


REPO_PATH = re.compile(
    r"(?<![\w./<-])((?:gmcurv|cli|sample_models|tests|scripts|bench|docs)/[\w./-]*)"
)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_repository_paths_named_in_the_pages_exist(page: Path):
    """A path like `gmcurv/fisher.py` or `sample_models/tiny_gpt` in the text (prose, code
    spans and examples) names a file or directory of this repository: it must exist."""
    missing = sorted(
        {
            p
            for p in (m.rstrip(".") for m in REPO_PATH.findall(page.read_text(encoding="utf-8")))
            if not (ROOT / p).exists()
        }
    )
    assert not missing, f"{page.relative_to(ROOT)} names missing paths: {missing}"


def test_design_page_names_every_layer_of_the_map():
    path = ROOT / "tests" / "test_architecture.py"
    if not path.is_file():
        pytest.skip("no layer map")
    spec = importlib.util.spec_from_file_location("_layer_map", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["_layer_map"] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["_layer_map"]
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line for line in design.splitlines() if line[:2] == "| "}
    for layer in module.LAYERS:
        assert layer.name in rows, f"docs/design.md: no row for layer {layer.name}"
        for name in layer.modules:
            short = name.rpartition(".")[2]
            assert short in rows[layer.name], f"docs/design.md: layer {layer.name} lacks {name}"


# header-metadata keys and file names that look like module names
NOT_MODULES = {
    "N", "arch", "arch_config", "dtype", "fisher", "kind", "loss", "masks", "masks_for",
    "mc_samples", "method", "probes", "pruning", "seed", "source_sha256", "step", "toml",
    "version",
}  # fmt: skip
DOTTED = re.compile(r"`(gmcurv(?:\.\w+)+)`")


def _resolves(name: str) -> bool:
    """Is `name` a module, or an attribute reached from the longest importable prefix?"""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part, None)
        return obj is not None
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_module_names_in_the_pages_exist(page: Path):
    """`gmcurv.x.y` in a code span names a module (or a name in one): it must exist."""
    missing = []
    for name in sorted(set(DOTTED.findall(page.read_text(encoding="utf-8")))):
        if name.split(".")[1] in NOT_MODULES:
            continue
        if not _resolves(name):
            missing.append(name)
    assert not missing, f"{page.relative_to(ROOT)} names missing modules: {missing}"


FROM_IMPORT = re.compile(r"^\s*from (gmcurv[\w.]*) import ([\w, ]+)$", re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_import_existing_names(page: Path):
    """`from gmcurv.x import y` in an example: the module and the names exist."""
    missing = [
        f"{module}.{name.strip()}"
        for module, names in FROM_IMPORT.findall(page.read_text(encoding="utf-8"))
        for name in names.split(",")
        if not _resolves(f"{module}.{name.strip()}")
    ]
    assert not missing, f"{page.relative_to(ROOT)}: examples import missing names {missing}"

"""Packaging: `cli/` and `sample_models/` sit beside `gmcurv/` and install as `gmcurv.cli` /
`gmcurv.sample_models` (pyproject.toml `package-dir`). Every package is listed, and a wheel
built from the tree ships the front end, the samples, the head and its card, and runs
`gmcurv trace` / `gmcurv head info` from a directory outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest

from gmcurv.results import report_schema

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
SKIP = ("__pycache__", "*.pyc", "*.egg-info", "build")


def _files(base: Path) -> list[Path]:
    return [
        p
        for p in base.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]


def _packages_on_disk() -> set[str]:
    """Dotted names of every directory holding Python modules, through `package-dir`."""
    names = set()
    for name, rel in SETUPTOOLS["package-dir"].items():
        base = ROOT / rel
        for module in _files(base):
            if module.suffix == ".py":
                names.add(".".join((name, *module.parent.relative_to(base).parts)))
    return names


def test_every_package_is_listed_in_pyproject():
    listed = set(SETUPTOOLS["packages"])
    missing = _packages_on_disk() - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert not listed - _packages_on_disk() - {"gmcurv.sample_models"}
    assert SETUPTOOLS["package-dir"] == {
        "gmcurv": "gmcurv",
        "gmcurv.cli": "cli",
        "gmcurv.sample_models": "sample_models",
    }


def _wheel_names() -> set[str]:
    """What the wheel must hold: every module and sample file at its installed name."""
    want = {"gmcurv/schema/report.schema.json"}
    for name, rel in SETUPTOOLS["package-dir"].items():
        base = ROOT / rel
        for f in _files(base):
            if f.suffix == ".py" or name == "gmcurv.sample_models":
                want.add("/".join((*name.split("."), *f.relative_to(base).parts)))
    return want


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """Build a wheel from a copy of the tree (the repository stays clean) and install it
    into a fresh target directory: (wheel, target)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _mkdir(tmp / "src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("gmcurv", "cli", "sample_models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns(*SKIP))
    env = {
        **os.environ,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    pip = [sys.executable, "-m", "pip"]
    flags = ["--no-deps", "--no-index", "--no-build-isolation", "-q"]
    r = _run([*pip, "wheel", *flags, "-w", str(tmp / "dist"), str(src)], tmp, env)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp / "dist").glob("gmcurv-*.whl")
    target = tmp / "site"
    install = [*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target)]
    r = _run([*install, str(wheel)], tmp, env)
    assert r.returncode == 0, r.stdout + r.stderr
    return wheel, target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_wheel_holds_the_front_end_samples_head_and_card(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = z.read(entry_points).decode()
    missing = _wheel_names() - names
    assert not missing, sorted(missing)
    for shipped in (
        "gmcurv/sample_models/GRADMETANET_HEAD_CARD.md",
        "gmcurv/sample_models/gradmetanet_head.safetensors",
        "gmcurv/sample_models/digits_mlp/model.safetensors",
        "gmcurv/sample_models/digits_mlp/data/shard-000.safetensors",
        "gmcurv/sample_models/tiny_gpt/config.json",
        "gmcurv/cli/plots/__init__.py",
    ):
        assert shipped in names
    top = {n.split("/", 1)[0] for n in names}  # no top-level cli or sample_models
    assert {t for t in top if not t.endswith(".dist-info")} == {"gmcurv"}, top
    assert "gmcurv = gmcurv.__main__:main" in scripts
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_installed_wheel_runs_trace_and_head_info_outside_the_repository(installed, tmp_path):
    _, target = installed
    away = _mkdir(tmp_path / "elsewhere")
    assert ROOT not in away.resolve().parents
    env = {
        **os.environ,
        "PYTHONPATH": str(target),  # only the installed copy (no tree of a worktree)
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "GMCURV_NO_CONFIG": "1",
    }
    env.pop("GMCURV_HEAD", None)
    probe = (
        "import json, gmcurv, gmcurv.cli.app, gmcurv.io.samples as s;"
        "print(json.dumps([gmcurv.__file__, gmcurv.cli.app.__file__, str(s.SAMPLE_ROOT)]))"
    )
    r = _run([sys.executable, "-c", probe], away, env)
    assert r.returncode == 0, r.stderr
    for where in json.loads(r.stdout):  # the repository cannot shadow the installed copy
        assert target.resolve() in Path(where).resolve().parents, where

    r = _run([sys.executable, "-m", "gmcurv", "trace", "-q", "-o", "r.json"], away, env)
    assert r.returncode == 0, r.stderr
    doc = json.loads((away / "r.json").read_text())
    jsonschema.validate(doc, report_schema())
    assert doc["command"] == "trace" and doc["results"]["fisher"]["trace"]["value"] > 0
    assert target.resolve() in Path(doc["model"]["path"]).resolve().parents

    r = _run([sys.executable, "-m", "gmcurv", "head", "info", "--json"], away, env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, report_schema())
    card = Path(doc["results"]["card_file"])
    assert card.is_file() and target.resolve() in card.resolve().parents
    assert doc["results"]["card"] == card.read_text()
    assert list(away.iterdir()) == [away / "r.json"]  # nothing else written where the user is

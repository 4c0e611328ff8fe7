"""The wheel ships the migrations, and an installed copy works outside the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from conftest import head_revision

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_migrations_and_installed_package_creates_a_store(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("tdstore", "migrations"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("tdstore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"tdstore/migrations/env.py", "tdstore/migrations/script.py.mako",
            "tdstore/migrations/versions/0001_initial.py",
            "tdstore/migrations/versions/0002_agent_attrs.py",
            "tdstore/migrations/versions/0003_null_stats.py"} <= names
    assert not any(n.startswith("migrations/") for n in names)  # no stray top-level package
    # every module of the package is in the wheel (a subpackage missing from pyproject's
    # package list would install without it)
    modules = {str(f.relative_to(REPO)) for f in (REPO / "tdstore").rglob("*.py")}
    assert modules <= names, sorted(modules - names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = textwrap.dedent("""
        import sqlite3, sys, numpy as np, tdstore
        assert tdstore.__file__.startswith(sys.argv[1]), tdstore.__file__
        with tdstore.open("store") as s:
            s.group("g").register_master("m", np.ones((2, 3), np.float32))
        con = sqlite3.connect("store/catalog.sqlite")
        print(con.execute("SELECT version_num FROM alembic_version").fetchone()[0])
    """)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code, str(site)], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == head_revision()


def test_a_source_checkout_finds_its_migrations():
    """Run from the checkout without installing (``python -c`` in the repository root
    imports the source tree), the Alembic scripts are found beside the package."""
    done = subprocess.run(
        [sys.executable, "-c", "import tdstore, tdstore.storage.catalog as c; "
         "print(tdstore.__file__); print(c.source_migrations_dir()); "
         "print(c.migrations_dir())"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    module, source, migrations = done.stdout.split()
    assert module == str(REPO / "tdstore" / "__init__.py")
    assert source == str(REPO / "migrations")
    assert (Path(migrations) / "env.py").is_file()

"""``sdk.paths.confined``: the one place where a network value becomes a path, and a check that the
agent's and the fleet's stores build no such path any other way."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from sdk.errors import ProtocolError
from sdk.paths import confined

ROOT = Path(__file__).resolve().parents[2]

#: the modules that turn values from messages (sha256s, model names, versions, chunk indices)
#: into paths: the agent's transfers and model store, the fleet's bundle store and chunk cache
STORE_MODULES = ["agent/store.py", "agent/transfer.py", "fleet/bundlestore.py", "fleet/chunks.py"]
#: what each module must go through: ``confined`` itself, or the store that uses it
THROUGH = {"fleet/chunks.py": "BundleStore"}


@pytest.mark.parametrize("part", [
    "", ".", "..", "../x", "a/b", "/etc", "a\0b", " x", "-rf", ".hidden",
    "./../" * 12 + "./..",  # 64 characters of path, as a hostile bundle_sha256
    "x" * 129,
])
def test_confined_refuses_anything_but_one_plain_name(tmp_path: Path, part: str) -> None:
    with pytest.raises(ProtocolError):
        confined(tmp_path, part)
    with pytest.raises(ProtocolError):
        confined(tmp_path, "ok", part)


@pytest.mark.parametrize("part", [None, 3, b"abc"])
def test_confined_refuses_non_strings(tmp_path: Path, part: object) -> None:
    with pytest.raises(ProtocolError):
        confined(tmp_path, part)  # type: ignore[arg-type]


def test_confined_joins_plain_names_under_the_root(tmp_path: Path) -> None:
    sha = "ab" * 32
    assert confined(tmp_path, "transfers", sha) == tmp_path / "transfers" / sha
    assert confined(tmp_path, sha, "3", suffix=".part") == tmp_path / sha / "3.part"


def test_confined_refuses_a_symlink_that_leads_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(ProtocolError, match="outside"):
        confined(root, "link", "x")


def _path_joins(tree: ast.AST) -> list[tuple[int, str]]:
    """Every place that joins a non-literal into a path by other means than ``confined``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if not (isinstance(right, ast.Constant) and isinstance(right.value, str)):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func.endswith(".joinpath") or func in ("os.path.join", "path.join"):
                found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize("module", STORE_MODULES)
def test_stores_join_network_values_only_through_confined(module: str) -> None:
    source = (ROOT / module).read_text()
    tree = ast.parse(source)
    assert _path_joins(tree) == [], f"{module} builds paths without sdk.paths.confined"
    through = THROUGH.get(module, "confined(")
    assert through in source, f"{module} never goes through {through}"


def test_the_scan_finds_a_join_it_should_refuse() -> None:
    bad = ast.parse("def f(root, sha):\n    return root / sha / f'{sha}.part'\n")
    assert len(_path_joins(bad)) == 2
    assert _path_joins(ast.parse("p = root / 'models'\nq = confined(root, sha)")) == []

"""``sdk.paths.confined``: the one place where a network value becomes a path, and a check that no
module of the agent, the fleet or sdk builds such a path any other way."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from sdk.errors import ProtocolError
from sdk.paths import confined

ROOT = Path(__file__).resolve().parents[2]

#: every module of the agent, the fleet and sdk, sub-packages (fleet/storage, fleet/http) included
MODULES = sorted(str(p.relative_to(ROOT)) for pkg in ("agent", "fleet", "sdk") for p in (ROOT / pkg).rglob("*.py"))
#: the joins of non-literals that involve no network value, each with why
ALLOWED = {
    ("agent/cli.py", "self.root / p.relative_to('/')"): "agent install --root: a path of the target system, from the CLI",
    ("agent/cli.py", "self.root / p"): "the same, for a relative path",
    ("agent/cli.py", "Path('/etc') / database"): "'passwd' or 'group', from the code",
    ("agent/cli.py", "os.path.join(dirpath, name)"): "os.walk of the agent's own state dir, handed to its user",
    ("fleet/credentials.py", "where / p.name"): "the operator's --broker-files-dir and the credentials store's own files",
    ("fleet/credentials.py", "self.install_dir / self.ca_file.name"): "the operator's --install-dir and the store's files",
    ("fleet/credentials.py", "self.install_dir / self.client_cert.name"): "the same",
    ("fleet/credentials.py", "self.install_dir / self.client_key.name"): "the same",
    ("fleet/http/uploads.py", "Path(tmp) / default_name"): "a fresh temporary dir and a name from the code (the client's "
                                                           "name for the file goes through confined)",
    ("sdk/paths.py", "base.joinpath(*parts[:-1], parts[-1] + suffix)"): "confined itself, once every part is checked",
}
#: the stores that turn values from messages (sha256s, model names, versions, chunk indices, job
#: ids) into files, and what each goes through: ``confined`` itself, or the store that uses it
THROUGH = {"agent/store.py": "confined(", "agent/transfer.py": "confined(", "fleet/storage/sqlite.py": "confined(",
           "fleet/bundlestore.py": "self.blobs.", "fleet/chunks.py": "BundleStore"}


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


#: how a name that holds a path is usually called, and calls that return one
_PATH_NAME = re.compile(r"(?i)(root|dir|directory|path|home|base|folder|where|tmp|file|store|location|parent)$")
_PATH_CALLS = {"Path", "PurePath", "PosixPath", "confined", "resolve", "absolute", "expanduser", "with_name",
               "with_suffix", "home", "cwd", "joinpath"}
_PATH_TYPES = re.compile(r"\b(Path|PathLike)\b")


def _last(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


class _Module:
    """What one module's source says about its names: string constants, and names that hold paths
    (annotated Path/PathLike, assigned a path, or called like one), so that ``a / b`` can be told
    apart from a division."""

    def __init__(self, tree: ast.Module) -> None:
        self.literals = {t.id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
                         and isinstance(n.value.value, str) for t in n.targets if isinstance(t, ast.Name)}
        self.paths: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation is not None \
                    and _PATH_TYPES.search(ast.unparse(node.annotation)):
                self.paths.add(node.arg if isinstance(node, ast.arg) else _last(node.target) or "")
        for _ in range(3):  # a name assigned a name that holds a path holds one too
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and self.is_path(node.value):
                    self.paths.update(name for name in map(_last, node.targets) if name)

    def literal(self, node: ast.AST) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or (
            isinstance(node, ast.Name) and node.id in self.literals)

    def is_path(self, node: ast.AST) -> bool:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return self.is_path(node.left)
        if isinstance(node, ast.Call):
            return _last(node.func) in _PATH_CALLS
        name = _last(node)
        return name is not None and (name in self.paths or bool(_PATH_NAME.search(name)))


def _path_joins(tree: ast.Module) -> list[tuple[int, str]]:
    """Every place that joins a non-literal into a path by other means than ``confined``: ``path /
    x``, ``os.path.join(a, x)``, ``Path(a, x)``, ``a.joinpath(x)``."""
    module = _Module(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if module.is_path(node.left) and not module.literal(node.right):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            joined = node.args[1:] if func in ("os.path.join", "path.join", "Path", "PurePath") else \
                node.args if func.endswith(".joinpath") else []
            if any(not module.literal(a) for a in joined):
                found.append((node.lineno, ast.unparse(node)))
    return found


def _all_joins() -> dict[tuple[str, str], int]:
    return {(m, src): line for m in MODULES for line, src in _path_joins(ast.parse((ROOT / m).read_text()))}


def test_no_module_joins_a_non_literal_into_a_path_but_through_confined() -> None:
    assert {"agent/store.py", "fleet/storage/sqlite.py", "fleet/http/uploads.py", "sdk/protocol.py"} <= set(MODULES)
    joins = _all_joins()
    unexpected = [f"{m}:{line}: {src}" for (m, src), line in sorted(joins.items()) if (m, src) not in ALLOWED]
    assert unexpected == [], "paths built without sdk.paths.confined (use it, or allow the join with a reason)"
    assert set(ALLOWED) <= set(joins), f"allowed joins that are gone: {sorted(set(ALLOWED) - set(joins))}"


@pytest.mark.parametrize("module", sorted(THROUGH))
def test_the_stores_go_through_confined(module: str) -> None:
    assert THROUGH[module] in (ROOT / module).read_text(), f"{module} never goes through {THROUGH[module]}"


def test_the_scan_finds_a_join_it_should_refuse() -> None:
    bad = ast.parse("def f(root, sha):\n    return root / sha / f'{sha}.part'\n"
                    "def g(x: Path, name):\n    p = x.parent\n    return p / name, os.path.join(p, name), Path(p, name)\n"
                    "def h(self, job):\n    return self.state_dir / 'jobs' / job, Path('/tmp') / job\n")
    assert len(_path_joins(bad)) == 7
    fine = "NAME = 'models'\np = root / 'models' / NAME\nq = confined(root, sha)\nr = done / elapsed\ns = n / 60\n"
    assert _path_joins(ast.parse(fine)) == []

"""Layers point one way, checked on the source with ``ast`` (no import needed, nothing executed).

- ``apps/core`` is the floor: it imports no domain app, not even inside a function, and names
  none in a dotted string (``include("apps.x.urls")``, ``import_module``, a ``target_class``).
- Nobody reaches a Celery task through a string: ``getattr(tasks, name)`` or
  ``app.send_task("name")`` fail only when the task runs, where an import of the task function
  fails at start (STYLE.md §10).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "apps" / "core"
# Project code, not the virtualenv or generated trees.
SCANNED = ("apps", "crosslogic", "tests", "bench", "scripts", "vllm_sim")
_DOMAIN_PATH = re.compile(r"apps\.(?!core\b)\w+(\.\w+)*")


def _python_files(*tops: Path) -> Iterator[Path]:
    for top in tops:
        if top.is_file():
            yield top
        elif top.is_dir():
            yield from (p for p in sorted(top.rglob("*.py")) if ".venv" not in p.parts)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """Every module an import statement anywhere in ``path`` names, relative ones resolved."""
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if node.module is None:  # from . import x: each x may be a module
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}"
            else:
                yield node.lineno, module


def core_violations(paths: list[Path], root: Path = ROOT) -> list[str]:
    found = []
    for path in paths:
        where = path.relative_to(root)
        for line, module in _imported_modules(path, root):
            if module.startswith("apps.") and not (module == "apps.core" or module.startswith("apps.core.")):
                found.append(f"{where}:{line} imports {module}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOMAIN_PATH.fullmatch(node.value):
                found.append(f"{where}:{node.lineno} names {node.value!r}")
    return sorted(found, key=lambda v: (v.split(":")[0], int(v.split(":")[1].split()[0])))


def _task_module_aliases(tree: ast.AST) -> set[str]:
    """Names a module binds to a tasks module: ``from apps.x import tasks``, ``import a.tasks as t``."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name == "tasks" or ((node.module or "").endswith("tasks") and alias.name == "*"):
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[-1] == "tasks":
                    aliases.add(alias.asname or alias.name.split(".")[0])
    return aliases


def _is_tasks_ref(node: ast.AST, aliases: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in aliases or node.id == "tasks"
    return isinstance(node, ast.Attribute) and node.attr == "tasks"


def task_by_string_violations(paths: list[Path], root: Path = ROOT) -> list[str]:
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = _task_module_aliases(tree)
        where = path.relative_to(root)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                if (
                    isinstance(func, ast.Name)
                    and func.id == "getattr"
                    and node.args
                    and _is_tasks_ref(node.args[0], aliases)
                ):
                    found.append(f"{where}:{node.lineno} getattr on a tasks module")
                elif isinstance(func, ast.Attribute) and func.attr == "send_task":
                    found.append(f"{where}:{node.lineno} send_task by name")
            elif (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "tasks"
                and isinstance(node.slice, ast.Constant)
                and isinstance(node.slice.value, str)
            ):
                # app.tasks["apps.x.tasks.y"]: Celery's task registry looked up by a name.
                found.append(f"{where}:{node.lineno} task registry looked up by name")
    return sorted(found, key=lambda v: (v.split(":")[0], int(v.split(":")[1].split()[0])))


def _project_files() -> list[Path]:
    return list(_python_files(*(ROOT / top for top in SCANNED)))


def test_core_imports_no_domain_app() -> None:
    assert core_violations(list(_python_files(CORE))) == []


def test_no_module_reaches_a_task_through_a_string() -> None:
    assert task_by_string_violations(_project_files()) == []


# --- the checks themselves catch what they are for -------------------------------------------


def test_core_check_sees_function_level_relative_and_string_imports(tmp_path: Path) -> None:
    core = tmp_path / "apps" / "core"
    core.mkdir(parents=True)
    bad = core / "bad.py"
    bad.write_text(
        "from apps.core import redis\n"
        "from . import paginator\n"
        "def f():\n    from apps.tenancy.models import ApiKey\n"
        "from .. import fleet\n"
        "import apps.metering.selectors as s\n"
        "URLS = 'apps.catalog.api_urls'\n"
        "DOC = 'mentions apps.catalog in prose'\n"
    )
    assert [v.split(" ", 1)[1] for v in core_violations([bad], root=tmp_path)] == [
        "imports apps.tenancy.models",
        "imports apps.fleet",
        "imports apps.metering.selectors",
        "names 'apps.catalog.api_urls'",
    ]


def test_task_check_sees_getattr_send_task_and_registry_lookups(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from apps.fleet import tasks\n"
        "import apps.catalog.tasks as ctasks\n"
        "from celery import current_app\n"
        "def f(name):\n"
        "    getattr(tasks, name)\n"
        "    getattr(ctasks, 'upload_task')\n"
        "    current_app.send_task('apps.fleet.tasks.node_launch_task')\n"
        "    current_app.tasks['apps.fleet.tasks.node_launch_task']\n"
        "    tasks.node_launch_task.delay(1)\n"  # the right way: not reported
        "    getattr(object(), name)\n"  # not a tasks module: not reported
    )
    assert [v.split(":", 1)[1] for v in task_by_string_violations([bad], root=tmp_path)] == [
        "5 getattr on a tasks module",
        "6 getattr on a tasks module",
        "7 send_task by name",
        "8 task registry looked up by name",
    ]

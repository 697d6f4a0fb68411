"""Fleet imports run one way, so each module can be read (and imported) without the ones above it:

    periodic → health, reconcile → services → enqueue → tasks → lifecycle, health → transitions → models

and work is queued by importing the task function, never by a task name in a string.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from django.db import transaction

from apps.fleet import tasks
from apps.fleet.models import Launcher, LaunchProfile, Node
from apps.fleet.placement import Placement
from apps.fleet.services import node_create, node_relaunch, node_request_launch, node_terminate

FLEET = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in FLEET.rglob("*.py") if "tests" not in p.parts and "migrations" not in p.parts)


def _module(path: Path) -> str:
    return ".".join(("apps", *path.relative_to(FLEET.parent).with_suffix("").parts)).removesuffix(".__init__")


MODULES = {_module(p): p for p in SOURCES}


def _top_level_imports(path: Path) -> set[str]:
    """apps.fleet modules imported when ``path`` is imported (not inside functions or TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from apps.fleet import sky
    return {name for name in found if name in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        path.append(name)
        for child in sorted(graph[name]):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state and (found := visit(child)):
                return found
        path.pop()
        state[name] = 2
        return []

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return []


def test_the_fleet_modules_import_each_other_without_a_cycle() -> None:
    graph = {name: _top_level_imports(path) - {name} for name, path in MODULES.items()}
    assert "apps.fleet.tasks" in graph["apps.fleet.enqueue"]  # the parser sees the imports it must
    assert _cycle(graph) == []


@pytest.mark.parametrize(
    "module",
    ["apps.fleet.transitions", "apps.fleet.lifecycle", "apps.fleet.health", "apps.fleet.tasks", "apps.fleet.enqueue"],
)
def test_the_lower_layers_do_not_import_services(module: str) -> None:
    imported, seen, todo = set(), set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            imported |= (children := _top_level_imports(MODULES[name]))
            todo += children
    assert "apps.fleet.services" not in imported
    assert "apps.fleet.reconcile" not in imported


def test_no_fleet_module_imports_an_app_inside_a_function() -> None:
    # Imports inside functions were how the old cycles were held together; sky.py's lazy
    # ``import sky`` (a slow third-party import) is the one kind allowed.
    late = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    module = (
                        inner.module
                        if isinstance(inner, ast.ImportFrom)
                        else ",".join(a.name for a in inner.names)
                        if isinstance(inner, ast.Import)
                        else None
                    )
                    if module and module.startswith("apps."):
                        assert isinstance(inner, ast.Import | ast.ImportFrom)  # the only nodes with a module
                        late.append(f"{path.name}:{inner.lineno} {module}")
    assert late == []


def test_no_task_is_named_in_a_string() -> None:
    names = {name for name in dir(tasks) if name.endswith("_task")} | {"fleet_health_check", "fleet_reconcile"}
    assert {"node_launch_task", "node_teardown_task"} <= names
    strings = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and any(name in node.value for name in names)
            ):
                strings.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert strings == []


# --- enqueue: work is sent once the transaction commits, to the task function itself -------------


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, object]]:
    calls: list[tuple[str, object]] = []
    for task in (tasks.node_launch_task, tasks.node_teardown_task, tasks.node_check_health_task):
        monkeypatch.setattr(task, "delay", lambda arg, _name=task.name: calls.append((_name.rsplit(".", 1)[1], arg)))
    return calls


@pytest.mark.django_db(transaction=True)
def test_a_launch_is_sent_after_commit_and_not_at_all_after_a_rollback(served_model, sent) -> None:
    with transaction.atomic():
        (node,) = node_request_launch(model=served_model, placement=Placement(launcher=Launcher.LOCAL))
        assert sent == []  # the worker must not look for a row that is not committed
    assert sent == [("node_launch_task", node.pk)]

    class RolledBackError(Exception):
        pass

    with pytest.raises(RolledBackError), transaction.atomic():
        node_request_launch(model=served_model, placement=Placement(launcher=Launcher.LOCAL))
        raise RolledBackError
    assert sent == [("node_launch_task", node.pk)]


@pytest.mark.django_db(transaction=True)
def test_terminating_a_started_node_sends_its_teardown(served_model, sent) -> None:
    node = node_create(model=served_model, launcher=Launcher.LOCAL)
    Node.objects.filter(pk=node.pk).update(status="provisioning")
    node.refresh_from_db()
    node_terminate(node=node)
    assert sent == [("node_teardown_task", node.pk)]


# --- Placement ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_relaunch_copies_the_placement_but_only_a_static_node_keeps_its_endpoint(served_model) -> None:
    profile = LaunchProfile.objects.create(name="us-first", placements=[{"cloud": "aws", "region": "us-east-1"}])
    sky = node_create(
        model=served_model,
        launcher=Launcher.SKYPILOT,
        cloud="gcp",
        region="us-central1",
        accelerator="A100:1",
        use_spot=False,
        launch_profile=profile,
    )
    Node.objects.filter(pk=sky.pk).update(endpoint_url="http://10.0.0.7:8000")
    sky.refresh_from_db()
    static = node_create(model=served_model, launcher=Launcher.STATIC, endpoint_url="http://127.0.0.1:9")

    new = node_relaunch(node=sky)
    assert Placement.of(new) == Placement(
        launcher="skypilot",
        cloud="gcp",
        region="us-central1",
        accelerator="A100:1",
        use_spot=False,
        launch_profile=profile,
    )
    assert new.endpoint_url == ""  # the old machine's address is not the new one's
    assert Placement.of(static).endpoint_url == "http://127.0.0.1:9"

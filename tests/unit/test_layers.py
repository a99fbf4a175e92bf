"""The import direction of DESIGN §1: leaves stay leaves, handlers never see the supervisor."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: A module may import project modules of a strictly lower layer only.
LAYERS: dict[str, int] = {
    "worker.errors": 0,
    "worker.states": 1, "worker.fsutil": 1, "worker.signals": 1, "worker.systemd": 1,
    "worker.logs": 1, "worker.metrics": 1, "worker.cgroups": 1, "worker.landlock": 1,
    "worker.syscall_filter": 1, "worker.memory": 1, "worker.backlog": 1, "worker.transports": 1,
    "worker.forkhooks": 1, "worker.shortage": 1,
    "worker.spec": 2,
    "worker.config": 3, "handlers.base": 3,
    "worker.progress": 4, "worker.spool": 4, "worker.watch": 4, "worker.registry": 4,
    "worker.routing": 4, "worker.results": 4, "worker.workdirs": 4,
    "worker.sandbox": 5, "worker.service": 5, "worker.transports.redis": 5, "worker.netns": 5.5,
    "worker.isolation": 6,
    "worker.child": 7, "worker.zygote": 7.5, "worker.spare": 7.7,
    "worker.job": 8,
    "worker.intake": 9,
    "worker.supervisor": 10,
    "worker.cli": 11, "worker.__main__": 12, "worker": 0,
}
HANDLER_MAY_IMPORT = {"handlers.base", "worker.spec", "worker.errors", "worker"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in LAYERS or (ROOT / f"{n.replace('.', '/')}.py").exists())
    return found


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py"))


def test_every_worker_module_has_a_layer() -> None:
    missing = [_module_name(p) for p in _sources("worker") if _module_name(p) not in LAYERS
               and not _module_name(p).startswith("worker.transports")]
    assert missing == [], f"give these modules a layer in test_layers.LAYERS: {missing}"


def test_worker_imports_point_one_way() -> None:
    bad = []
    for path in _sources("worker"):
        me = _module_name(path)
        mine = LAYERS.get(me)
        if mine is None:
            continue
        for dep in _project_imports(path):
            if dep != "worker" and dep in LAYERS and LAYERS[dep] >= mine:
                bad.append(f"{me} (layer {mine}) imports {dep} (layer {LAYERS[dep]})")
    assert bad == []


def test_handlers_see_only_base_spec_and_errors() -> None:
    bad = []
    for path in _sources("handlers"):
        me = _module_name(path)
        allowed = {"worker.errors", "worker.spec", "worker"} if me == "handlers.base" \
            else HANDLER_MAY_IMPORT | {me}
        family = me.split(".")[-1].split("_")[0]  # guestkit_inspect may use guestkit_image
        for dep in _project_imports(path):
            same_family = dep.startswith(f"handlers.{family}_") and me != "handlers.base"
            if dep not in allowed and not same_family:
                bad.append(f"{me} imports {dep}")
    assert bad == []


def test_the_checker_sees_a_violation() -> None:
    tree = ROOT / "worker" / "states.py"
    assert "worker.errors" in _project_imports(tree)
    assert "worker.child" in _project_imports(ROOT / "worker" / "job.py")

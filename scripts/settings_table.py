"""Print the README's configuration table: every setting crosslogic/settings.py reads from the
environment, its default (as written in settings.py) and its description (from .env.example).

    .venv/bin/python scripts/settings_table.py                  # print it
    .venv/bin/python scripts/settings_table.py --write-readme   # replace it in README.md
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def settings_defaults() -> dict[str, str]:
    source = (ROOT / "crosslogic" / "settings.py").read_text()
    found: dict[str, str] = {}
    calls = sorted((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)), key=lambda n: n.lineno)
    for node in calls:
        if not node.args:
            continue
        func = node.func
        is_env = (isinstance(func, ast.Name) and func.id in {"env", "_env_or_fail"}) or (
            isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "env"
        )
        first = node.args[0]
        if not (is_env and isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        default = next((kw.value for kw in node.keywords if kw.arg == "default"), None)
        if default is None and len(node.args) >= 3:
            default = node.args[2]  # _env_or_fail(name, cast, default)
        found[first.value] = "" if default is None else ast.get_source_segment(source, default) or ""
    return found


def env_example_descriptions() -> dict[str, str]:
    descriptions: dict[str, str] = {}
    comment: list[str] = []
    after_variable = False
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=", line)
        if match:
            # Consecutive variables share the comment above them.
            descriptions.setdefault(match.group(1), " ".join(comment))
            after_variable = True
            continue
        if line.startswith("# ---") or not line.strip():
            comment = []
        elif line.startswith("#"):
            if after_variable:
                comment = []
            comment.append(line.lstrip("#").strip())
        after_variable = False
    return descriptions


def table() -> str:
    defaults = settings_defaults()
    descriptions = env_example_descriptions()
    rows = ["| Variable | Default | What it does |", "|---|---|---|"]
    for name, default in defaults.items():
        text = descriptions.get(name, "").replace("|", "\\|")
        shown = f"`{default}`".replace("|", "\\|") if default else ""
        rows.append(f"| `{name}` | {shown} | {text} |")
    return "\n".join(rows)


def main() -> None:
    if "--write-readme" not in sys.argv[1:]:
        print(table())
        return
    readme = ROOT / "README.md"
    start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
    text = readme.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table()}\n{end}{tail}")
    print(f"updated the configuration table in {readme}")


if __name__ == "__main__":
    main()

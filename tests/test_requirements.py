"""`make run` installs only requirements.txt: everything the service imports must be there, not only in the
development requirements (which the tests run with, and so would not notice)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

from tools.processes import ROOT

# What `make run` starts: the service, its gunicorn settings, and the emulator of demo mode.
RUNTIME = ["app.py", "config.py", "background.py", "errors.py", "nanobanana_client.py", "gunicorn.conf.py"]
RUNTIME_FOLDERS = ["channels", "domain", "stores", "web"]
RUNTIME_TOOLS = ["tools/serve.py", "tools/emulator.py"]


def runtime_files() -> list[Path]:
    files = [ROOT / name for name in RUNTIME + RUNTIME_TOOLS]
    return files + [path for folder in RUNTIME_FOLDERS for path in (ROOT / folder).glob("*.py")]


def imported_modules(path: Path) -> set[str]:
    """The top-level names a file imports, at the top or inside a function (imported when it is used)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def required_distributions() -> set[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return {normal(re.split(r"[\[=<>~ ]", line)[0]) for line in lines if line.strip() and not line.startswith("#")}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def providers(module: str) -> set[str]:
    """The installed distributions that provide a top-level module."""
    return {normal(name) for name in importlib.metadata.packages_distributions().get(module, [])}


def test_everything_the_service_imports_is_in_requirements_txt():
    ours = {path.stem for path in ROOT.glob("*.py")} | set(RUNTIME_FOLDERS) | {"tools"}
    third_party = {
        module
        for path in runtime_files()
        for module in imported_modules(path)
        if module not in ours and module not in sys.stdlib_module_names
    }
    required = required_distributions()
    installed_by_requirements = set(required)
    for name in required:  # and what those depend on
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement:
                installed_by_requirements.add(normal(re.split(r"[\[=<>~!; (]", requirement)[0]))
    missing = {module for module in third_party if not providers(module) & installed_by_requirements}
    assert missing == set(), f"imported by the service but not installed by requirements.txt: {sorted(missing)}"

"""Static look-ups in a vLLM source tree, without importing it.

vLLM 0.33 needs torch 2.14 and CUDA, so it cannot be installed on the CPU machines this
project runs on; its wheel can be unpacked, though. :class:`SourceTree` answers, from the
``.py`` files alone, the two questions ``tests/test_vllm_api.py`` asks of every pinned symbol:
does ``module:Name`` resolve (through re-exports, star imports, ``TYPE_CHECKING`` imports and
vLLM's lazy ``MODULE_ATTRS`` table), and does it have a member — a parameter of the
function or of the class's ``__init__``, or a method, class attribute, annotated field or
``self.<name> = ...`` attribute of the class or one of its bases inside the tree.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Definition:
    """Where a symbol is defined: the module and its AST node (class, function or assignment)."""

    module: str
    node: ast.AST


class SourceTree:
    """The ``vllm`` package rooted at ``root`` (the directory holding ``vllm/__init__.py``'s files)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "__init__.py").is_file():
            raise FileNotFoundError(f"{self.root} is not a vllm package directory (no __init__.py)")

    # -- modules -----------------------------------------------------------------------

    def module_path(self, module: str) -> Path | None:
        parts = module.split(".")[1:]
        base = self.root.joinpath(*parts)
        for path in (base / "__init__.py", base.with_suffix(".py")):
            if path.is_file():
                return path
        return None

    @functools.lru_cache(maxsize=None)
    def _ast(self, module: str) -> ast.Module | None:
        path = self.module_path(module)
        return ast.parse(path.read_text(), str(path)) if path else None

    @staticmethod
    def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
        if not node.level:
            return node.module or ""
        package = module.split(".")
        if not is_package:
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        return ".".join(package + ([node.module] if node.module else []))

    # -- names -------------------------------------------------------------------------

    def resolve(self, module: str, name: str, _seen: frozenset = frozenset()) -> Definition | None:
        """The definition ``from module import name`` reaches, or None."""
        key = (module, name)
        if key in _seen:
            return None
        seen = _seen | {key}
        tree = self._ast(module)
        if tree is None:
            return None
        is_package = self.module_path(module).name == "__init__.py"
        stars = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                if node in tree.body:
                    return Definition(module, node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node in tree.body:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return Definition(module, node)
            elif isinstance(node, ast.ImportFrom):
                source = self._absolute(module, node, is_package)
                if not source.startswith("vllm"):
                    continue
                for alias in node.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        found = self.resolve(source, alias.name, seen)
                        if found is None and self.module_path(f"{source}.{alias.name}"):
                            found = Definition(f"{source}.{alias.name}", ast.Module(body=[], type_ignores=[]))
                        if found:
                            return found
        if is_package and self.module_path(f"{module}.{name}"):
            return Definition(f"{module}.{name}", ast.Module(body=[], type_ignores=[]))
        lazy = self._lazy_attr(module, tree, name)
        if lazy:
            return self.resolve(*lazy, seen)
        for source in stars:
            found = self.resolve(source, name, seen)
            if found:
                return found
        return None

    def _lazy_attr(self, module: str, tree: ast.Module, name: str) -> tuple[str, str] | None:
        """vLLM's ``MODULE_ATTRS = {"Name": ".module:Name"}`` table for a lazy ``__getattr__``."""
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "MODULE_ATTRS" for t in node.targets
            ):
                table = ast.literal_eval(node.value)
                if name in table:
                    target, attr = table[name].split(":")
                    return (module + target if target.startswith(".") else target), attr
        return None

    # -- members -----------------------------------------------------------------------

    def has_member(self, definition: Definition, member: str) -> bool:
        """Whether ``member`` is a parameter, method, attribute or field of the definition."""
        node = definition.node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return _accepts(node, member)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
            called = node.value.func  # e.g. ModelRegistry = _ModelRegistry(...)
            if isinstance(called, ast.Name):
                target = self.resolve(definition.module, called.id)
                return target is not None and self.has_member(target, member)
            return False
        if isinstance(node, ast.ClassDef):
            return self._class_has(definition.module, node, member, frozenset())
        return False

    def _class_has(self, module: str, node: ast.ClassDef, member: str, seen: frozenset) -> bool:
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if item.name == member:
                    return True
                if item.name == "__init__" and _accepts(item, member, var_keyword=False):
                    return True
                if any(_assigns_self(sub, member) for sub in ast.walk(item)):
                    return True
            elif isinstance(item, ast.Assign):
                if any(isinstance(t, ast.Name) and t.id == member for t in item.targets):
                    return True
            elif isinstance(item, ast.AnnAssign):
                if isinstance(item.target, ast.Name) and item.target.id == member:
                    return True
        for base in node.bases:
            name = base.id if isinstance(base, ast.Name) else None
            if name is None or (module, name) in seen:
                continue
            found = self.resolve(module, name)
            if found and isinstance(found.node, ast.ClassDef):
                if self._class_has(found.module, found.node, member, seen | {(module, name)}):
                    return True
        return False


def _accepts(func: ast.FunctionDef | ast.AsyncFunctionDef, name: str, var_keyword: bool = True) -> bool:
    args = func.args
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    return name in names or (var_keyword and args.kwarg is not None)


def _assigns_self(node: ast.AST, name: str) -> bool:
    targets = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    return any(
        isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self" and t.attr == name
        for t in targets
    )

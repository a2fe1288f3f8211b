"""Reading a recipe's YAML defensively: what a careless or hostile file must not do to us.

``yaml.safe_load`` already refuses arbitrary Python objects. What it still lets through, and what
:func:`load_yaml` refuses with a ``ValueError`` naming the file (and the line, for YAML problems):

* a file that is not a regular file (``/dev/zero`` would be read forever) or is larger than
  :data:`MAX_RECIPE_BYTES` — a recipe is a few KiB;
* bytes that are not UTF-8 (the message gives the line and the byte);
* a key given twice in one mapping — YAML keeps the last one silently, so a recipe could say one
  thing on line 20 and mean another on line 60 (a key overriding one merged in with
  ``<<: *anchor`` is fine: that is what merge keys are for);
* anchors / aliases that expand the document beyond :data:`MAX_YAML_NODES` nodes (the
  "billion laughs": nine nested lists of nine aliases are 9^9 nodes). PyYAML shares aliased
  objects, so parsing is cheap; the blow-up comes later, when validation walks or an error message
  prints the expanded value. The expanded size is computed on the node graph with memoisation, in
  time linear in the distinct nodes, and a recursive alias is refused too.

Used by :meth:`int4_qat.recipe.Recipe.load` (which turns the error into a ``RecipeError``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAX_YAML_NODES", "MAX_RECIPE_BYTES", "load_yaml"]


#: A recipe is a few dozen YAML nodes; anchors/aliases may not expand it beyond this.
MAX_YAML_NODES = 100_000
#: A recipe file is a few KiB; anything larger is not a recipe (and is not read into memory).
MAX_RECIPE_BYTES = 1 << 20


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (explicit keys only: a
    key overriding one merged in with ``<<: *anchor`` is what merge keys are for)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:                       # unhashable key: SafeLoader reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping (first on line "
                        f"{first.line + 1}); YAML would silently keep the last: remove one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


class _RecursiveAlias(ValueError):
    pass


def _expanded_nodes(root) -> int:
    """Nodes of the document with every alias expanded, computed in time linear in the *distinct*
    nodes (memoised), so a billion-laughs document is measured, not expanded."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n) -> int:
        k = id(n)
        if k in sizes:
            return sizes[k]
        if k in active:
            raise _RecursiveAlias("an alias refers to a node that contains it (recursive YAML)")
        active.add(k)
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(a) + size(b) for a, b in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(c) for c in n.value)
        else:
            total = 1
        active.discard(k)
        sizes[k] = min(total, MAX_YAML_NODES + 1)
        return sizes[k]

    return size(root)


def load_yaml(path: str | os.PathLike) -> Any:
    """Parse a recipe file defensively (see the module docstring); ``ValueError`` names the file,
    and the line for YAML problems."""
    p = Path(path)
    try:
        if not p.is_file():
            raise ValueError(f"{p}: {'is not a regular file' if p.exists() else 'does not exist'}; "
                              f"fix: give the path of a recipe YAML (recipes/<name>.yaml)")
        with open(p, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{p}: cannot read recipe: {e.strerror}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise ValueError(f"{p}: more than {MAX_RECIPE_BYTES} bytes: not a recipe (a recipe is a "
                         f"few KiB of YAML); fix: check the path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{p}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}); fix: save the recipe as UTF-8") from None
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_nodes(node)
        if n > MAX_YAML_NODES:
            raise ValueError(f"{p}: anchors/aliases expand the YAML to more than {MAX_YAML_NODES} "
                             f"nodes (an alias bomb?); fix: write the recipe without nested aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: {_yaml_error(e)}") from None
    except RecursionError:
        raise ValueError(f"{p}: YAML nested too deeply; fix: a recipe is a few flat sections") from None
    except _RecursiveAlias as e:
        raise ValueError(f"{p}: {e}; fix: remove the alias") from None
    finally:
        loader.dispose()


def _yaml_error(e: yaml.YAMLError) -> str:
    """``line L, column C: <problem>`` from PyYAML's marked errors."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = "; ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    if mark is None or not what:
        return "not valid YAML: " + " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {what}"

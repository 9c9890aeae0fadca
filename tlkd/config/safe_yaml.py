"""``yaml.safe_load`` with a bound on what aliases may expand to.

PyYAML builds an aliased value once and shares it, so a "billion laughs" file (nine anchors,
each a list of nine aliases of the one before) loads quickly, but everything that walks the
result afterwards (``base:`` merging, schema validation, saving the resolved config) sees
hundreds of millions of values. Here the composed node graph is measured first, each shared
node counted as often as it appears, in time linear in the file: a document that would expand
to more than :data:`MAX_VALUES` values, or that refers to itself, is refused before anything
is built. Small anchors and aliases (the usual way to reuse a section) load as with
``yaml.safe_load``.
"""

from __future__ import annotations

from typing import Any

import yaml

from tlkd.errors import ConfigError

MAX_VALUES = 100_000  # a real experiment file holds a few hundred


class AliasBombError(ConfigError, yaml.YAMLError):
    """A document whose aliases expand too far (or into themselves). A ConfigError (exit 2)
    for callers that do not format YAML errors themselves."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        self.problem_mark = None
        super().__init__(None, f"invalid YAML: {problem}")


def safe_load(text: str | bytes) -> Any:
    """``yaml.safe_load(text)``, refusing documents that expand past :data:`MAX_VALUES`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def expanded_size(node: yaml.Node, limit: int = MAX_VALUES) -> int:
    """How many nodes ``node`` stands for with every alias written out; raises AliasBombError
    above ``limit`` or for a node that contains itself."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise AliasBombError("an alias refers to the value that contains it (recursive)")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for item in n.value:
                total += size(item)
                if total > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        active.discard(key)
        if total > limit:
            raise AliasBombError(
                f"aliases expand to more than {limit:,} values (a 'billion laughs' file?)"
            )
        sizes[key] = total
        return total

    return size(node)

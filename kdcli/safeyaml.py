"""YAML as recipes are read: yaml.safe_load, bounded. A few lines of anchors and aliases can stand for billions of
values ("billion laughs"); such a document is refused from its parsed form, before anything is built from it."""

from __future__ import annotations

from typing import Any

import yaml

from kdcli.errors import KdcliError

MAX_YAML_NODES = 100_000  # values once aliases are expanded; a recipe has a few dozen


def load_yaml(text: str, what: str) -> Any:
    """yaml.safe_load, refusing a document whose aliases expand past MAX_YAML_NODES nodes (or into themselves)
    before anything is built from it: a few lines of anchors can otherwise stand for billions of values."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise KdcliError(f"{what}: holds more than {MAX_YAML_NODES} values once its aliases (*name) are expanded, "
                             "or an alias refers to itself; a recipe needs a few dozen, written out")
        return loader.construct_document(node)
    except RecursionError as err:
        raise KdcliError(f"{what}: nested too deeply to be a recipe") from err
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, float]) -> float:
    """How many nodes `node` stands for once every alias is expanded (shared nodes counted each time)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = float("inf")  # while it is being counted: an alias back to it is a cycle
    children = node.value if isinstance(node, yaml.SequenceNode) else (
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
    total = 1.0
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_YAML_NODES:
            break
    sizes[id(node)] = total
    return total

"""The strict YAML reader of the config and rule files.

The YAML reader is strict where YAML 1.1 surprises people:

- duplicate keys are errors (PyYAML keeps the last one silently);
- only ``true``/``false`` are booleans: ``on``/``off``/``yes``/``no`` stay strings,
  and where a boolean is expected they are an error that says to write true/false;
- ``22:22`` is a string, not the base-60 number 1342; ``0755`` is a string, not octal;
  where an integer is expected either is an error;
- dates stay strings.

Problems go to an :class:`Issues`, each with the file and a line or key path.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
import yaml.constructor
import yaml.nodes

from popproxy.config.model import SourceFile
from popproxy.policy.fields import Issues, join

# A config file is a few kilobytes; this bound keeps a wrong path (a log, a disk
# image) from being read whole into memory.
MAX_CONFIG_BYTES = 4 * 1024 * 1024

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars: no yes/no/on/off, no base 60, no octal 0755."""

    def construct_yaml_int_strict(self, node: yaml.nodes.ScalarNode) -> int:
        """Decimal (or 0x hex) integers only."""
        text = str(self.construct_scalar(node))
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)


# A copy of SafeLoader's table without YAML 1.1's bool, int, float and timestamp rules
# (add_implicit_resolver would otherwise append to the table shared with SafeLoader).
_StrictLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG)
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_StrictLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"),
)
_StrictLoader.add_constructor(_INT_TAG, _StrictLoader.construct_yaml_int_strict)


def read_bounded(path: Path, limit: int) -> bytes | OSError | None:
    """At most ``limit`` bytes of ``path``; None if it is longer, the error if unreadable."""
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        return exc
    return None if len(raw) > limit else raw


def read_yaml(
    path: Path,
    issues: Issues,
    what: str = "config file",
    limit: int = MAX_CONFIG_BYTES,
    *,
    sources: list[SourceFile] | None = None,
) -> object | None:
    """The parsed content of the YAML file at ``path``, or None (its problems in ``issues``).

    The octets read are added to ``sources`` (what ``popproxy run`` keeps a copy of).
    """
    raw = read_bounded(path, limit)
    if isinstance(raw, OSError):
        issues.add("(file)", f"cannot read the {what}: {raw.strerror or raw}")
        return None
    if raw is None:
        issues.add("(file)", f"expected a {what} of at most {limit} bytes")
        return None
    if sources is not None:
        sources.append(SourceFile(path, raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        issues.add("(file)", f"expected UTF-8 text (bad byte at offset {exc.start})")
        return None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            issues.add("(top level)", "expected a mapping of settings, got an empty file")
            return None
        _check_duplicates(node, "", issues, set())
        data: object = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        where = exc.problem_mark or exc.context_mark
        place = f"line {where.line + 1}, column {where.column + 1}" if where else "(file)"
        problem = exc.problem or exc.context or ""
        issues.add(place, f"not valid YAML: {problem}{_yaml_hint(problem)}")
        return None
    except yaml.YAMLError as exc:
        issues.add("(file)", f"not valid YAML: {exc}")
        return None
    else:
        return data
    finally:
        loader.dispose()


# PyYAML's wording of the mistakes people make most (its problem texts), and a hint for each.
_YAML_HINTS = (
    (
        "expected <block end>",
        "this line is indented differently from the lines above it: the keys of one"
        " mapping, and the '- ' items of one list, start in the same column",
    ),
    (
        "mapping values are not allowed here",
        "a 'key:' where a value was expected: this line is indented deeper than the key"
        " above it, or a value that holds ': ' needs quotes",
    ),
    (
        "could not find expected ':'",
        "a line inside a mapping without 'key:' (or indented less than the key above it)",
    ),
    ("found character '\\t'", "indent with spaces: YAML does not allow tabs there"),
    ("found undefined alias", "an '*' starts an alias: quote a value that begins with '*'"),
)


def _yaml_hint(problem: str) -> str:
    """A hint for PyYAML's ``problem`` text ("" if there is none)."""
    for start, hint in _YAML_HINTS:
        if problem.startswith(start):
            return f" (hint: {hint})"
    return ""


def _check_duplicates(node: yaml.Node, path: str, issues: Issues, seen: set[int]) -> None:
    """Report every key given twice in one mapping, with its key path and both lines."""
    if id(node) in seen:  # an alias: already checked (and no exponential walk on YAML bombs)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                _check_duplicates(value_node, path, issues, seen)
                continue
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            child = join(path, key)
            if key in first_line:
                issues.add(
                    child,
                    f"duplicate key (first at line {first_line[key]}, again at line {line});"
                    " give each key once",
                )
            else:
                first_line[key] = line
            _check_duplicates(value_node, child, issues, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{index}]", issues, seen)

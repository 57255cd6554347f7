"""Reading ``rules_dir``: which files are rule files, and their YAML (docs/rules.md).

Only the files and the YAML are handled here; ``popproxy/policy/schema.py`` checks
each file's content and builds the rules, with every problem naming the rule file,
the rule and the key.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from popproxy.config.model import SourceFile
from popproxy.config.reader import read_yaml
from popproxy.policy import Rule
from popproxy.policy.fields import Issues, Section
from popproxy.policy.rules import MAX_RULES
from popproxy.policy.schema import DeclaredAccounts, RuleSchema

# A rule file's name: two digits (the order), a dash, a name; nothing else is loaded.
_RULE_FILE_RE = re.compile(r"[0-9]{2}-[A-Za-z0-9._-]+\.yaml")
# Rule files read from one rules_dir: the two digits of NN-name.yaml give 100 places
# in the order; more files than that is a generated tree, not a policy.
MAX_RULE_FILES = 100
# A rule file holds a few rules (a rule is a few hundred bytes); this keeps a wrong
# file in rules_dir from being read whole.
MAX_RULE_FILE_BYTES = 256 * 1024
# Directory entries looked at in rules_dir (rule files and anything else lying there).
MAX_RULES_DIR_ENTRIES = 10 * MAX_RULE_FILES


def load_rules(
    rules_dir: Path, top: Section, issues: Issues, sources: list[SourceFile] | None = None
) -> tuple[Rule, ...]:
    """Every rule of every ``NN-name.yaml`` in ``rules_dir``, in file-name then list order.

    Problems are added to ``issues``, each naming the rule file, the rule (index and
    name) and the key. Globs are checked against the users and upstreams as written,
    so a user with a mistake of its own does not also make its rules fail.
    """
    shown_dir = Path(str(top.raw("rules_dir")))
    try:
        names = sorted(
            entry.name for entry in itertools.islice(rules_dir.iterdir(), MAX_RULES_DIR_ENTRIES + 1)
        )
    except OSError as exc:
        top.error("rules_dir", f"cannot list {rules_dir}: {exc.strerror or exc}")
        return ()
    if len(names) > MAX_RULES_DIR_ENTRIES:
        top.error("rules_dir", f"expected at most {MAX_RULES_DIR_ENTRIES} entries in {rules_dir}")
        return ()
    files: list[str] = []
    for name in names:
        if _RULE_FILE_RE.fullmatch(name):
            files.append(name)
        elif name.endswith((".yaml", ".yml")):
            Issues(str(shown_dir / name), issues.items).add(
                "(file)",
                "not loaded: a rule file is named NN-name.yaml (two digits, a dash, a name"
                " of letters, digits, '.', '_' or '-'); rename it",
            )
    if len(files) > MAX_RULE_FILES:
        top.error("rules_dir", f"expected at most {MAX_RULE_FILES} rule files")
        return ()
    schema = RuleSchema(DeclaredAccounts.written(top.raw("users"), top.raw("upstreams")))
    out: list[Rule] = []
    for name in files:
        file_issues = Issues(str(shown_dir / name), issues.items)
        data = read_yaml(
            rules_dir / name,
            file_issues,
            what="rule file",
            limit=MAX_RULE_FILE_BYTES,
            sources=sources,
        )
        if data is not None:
            out.extend(schema.rules_of(data, file_issues, name))
    if len(out) > MAX_RULES:
        top.error("rules_dir", f"expected at most {MAX_RULES} rules over all files, got {len(out)}")
    return tuple(out)

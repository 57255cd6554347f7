"""Retention policy: rules (``rules/*.yaml``) and the pure decisions made from them.

DESIGN.md, "Rules"; docs/rules.md. No I/O, YAML, trio or metrics here (the import
walk in tests/pop3/test_imports.py checks it): ``schema.py`` builds rules from a rule
file's parsed content, the config loader (``popproxy/config/``) reads the YAML, and
the session carries out what :class:`RetentionPlan` says.
"""

from __future__ import annotations

from popproxy.policy.decide import (
    EXPIRE_AT_QUIT,
    EXPIRE_NEVER,
    AccountPolicy,
    Candidate,
    Decision,
    Hidden,
    OnDele,
    Outcome,
    Planned,
    Policy,
    PollPlan,
    Reason,
    RetentionPlan,
    View,
)
from popproxy.policy.headers import MAX_HEADER_FIELDS, MAX_HEADER_OCTETS, Headers, parse_headers
from popproxy.policy.rules import DEFAULT_RULE, Action, HeaderMatch, Match, Rule, Setting

__all__ = [
    "DEFAULT_RULE",
    "EXPIRE_AT_QUIT",
    "EXPIRE_NEVER",
    "MAX_HEADER_FIELDS",
    "MAX_HEADER_OCTETS",
    "AccountPolicy",
    "Action",
    "Candidate",
    "Decision",
    "HeaderMatch",
    "Headers",
    "Hidden",
    "Match",
    "OnDele",
    "Outcome",
    "Planned",
    "Policy",
    "PollPlan",
    "Reason",
    "RetentionPlan",
    "Rule",
    "Setting",
    "View",
    "parse_headers",
]

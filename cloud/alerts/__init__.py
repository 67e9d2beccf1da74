"""Alert rules and the engine that turns fleet messages into alert transitions.

Example:
    >>> from cloud.alerts import AlertEngine, load_rules
    >>> engine = AlertEngine(load_rules(), instance="cloud-1")
    >>> engine.active()
    []
"""

from cloud.alerts.engine import AlertEngine
from cloud.alerts.errors import AcknowledgeError, AlertError, RuleError, SnapshotError
from cloud.alerts.rules import AbsenceRule, Rule, ThresholdRule, load_rules, parse_rules

__all__ = [
    "AbsenceRule",
    "AcknowledgeError",
    "AlertEngine",
    "AlertError",
    "Rule",
    "RuleError",
    "SnapshotError",
    "ThresholdRule",
    "load_rules",
    "parse_rules",
]

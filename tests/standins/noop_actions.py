"""An :class:`~application.ports.ActionRunner` with no rules: every action is only recorded.

The container uses the real runner (application/actions.py), which behaves like this one when
``action_rules`` is empty; tests and benchmarks that wire handlers by hand use this one.
"""

from __future__ import annotations

from application.errors import PermanentError
from application.incidents import Incident
from application.ports import ActionTrigger, PlannedAction


class NoActions:
    def plan(self, trigger: ActionTrigger) -> list[PlannedAction]:
        return []

    async def run(self, action: PlannedAction, incident: Incident) -> str:
        raise PermanentError(f"no rule runs {action.action}")


def adapters_off() -> dict[str, object]:
    """The handlers' side-effect dependencies as the container provides them with every adapter off."""
    return {"actions": NoActions(), "cluster": None, "issue_tracker": None, "notifier": None}

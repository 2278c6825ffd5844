"""The default :class:`~application.ports.ActionRunner`: knows no custom action.

OEC custom actions are then only recorded on the incident's timeline. The adapters replace this with a
runner that dispatches actions (e.g. ``restartDeployment``) to Kubernetes, GitHub, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from application.incidents import Incident


class NoActions:
    async def run(self, action: str, incident: Incident, payload: Mapping[str, Any]) -> str | None:
        return None

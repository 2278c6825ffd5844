"""Action rules, like Opsgenie OEC's action mapping: which events call for which action, and running it.

A rule is a trigger and one action, configured in the ``action_rules`` setting::

    {"name": "restart-on-label", "labels": {"incidentd_action": "restart"}, "action": "restart"}
    {"name": "restart-from-opsgenie", "oec_action": "restartDeployment", "action": "restart"}
    {"name": "scale-checkout", "labels": {"incidentd_action": "scale"}, "action": "scale", "replicas": 6}

Triggers: a rule with ``oec_action`` answers each OEC action of that name (someone ran it on the alert);
a rule without answers an Alertmanager alert that *opens* an incident (not its repeats, not its
resolution). ``labels`` narrows either: the alert's labels (OEC: the alert's details) must carry each
value given, or one of the values listed. A rule must name at least one of the two, so that no rule acts
on every incident.

Targets come from the same labels: the Deployment from the policy's namespace / deployment labels
(``namespace`` and ``deployment`` by default), ``scale``'s replica count from the rule or else from the
``incidentd_replicas`` label, ``ec2_reboot``'s instances from the ``instance_id`` label (comma-separated);
``lambda_invoke`` calls the rule's ``function`` with the incident as its payload.

With ``dry_run``, the adapters check each call and report what they would do; an action whose adapter
is disabled is then reported as what it would do, unchecked. Without ``dry_run`` the settings refuse a
rule whose adapter is disabled (config/settings.py), so that it fails at start-up, not at 3 a.m.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from application.errors import PermanentError
from application.incidents import Incident, IncidentPolicy
from application.ports import ActionTrigger, Cloud, Cluster, PlannedAction

log = structlog.get_logger("incidentd.actions")

ActionKind = Literal["restart", "scale", "ec2_reboot", "lambda_invoke"]
KUBERNETES_ACTIONS = frozenset({"restart", "scale"})
AWS_ACTIONS = frozenset({"ec2_reboot", "lambda_invoke"})
REPLICAS_LABEL = "incidentd_replicas"
INSTANCE_LABEL = "instance_id"


class ActionRule(BaseModel):
    """When a trigger matches, run ``action`` on the target the event names (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # How the timeline names the rule; default "rule-<position>". A colon would blur "name: result".
    name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,64}$")
    oec_action: str = ""  # e.g. "restartDeployment"; empty: an Alertmanager alert opening an incident
    labels: dict[str, str | list[str]] = Field(default_factory=dict)
    action: ActionKind
    replicas: int | None = Field(default=None, ge=0, le=10_000)  # scale only
    function: str = ""  # lambda_invoke only: function name or ARN

    @model_validator(mode="after")
    def _consistent(self) -> ActionRule:
        if not self.oec_action and not self.labels:
            raise ValueError("a rule needs oec_action or labels (else it would act on every incident)")
        if self.replicas is not None and self.action != "scale":
            raise ValueError("replicas applies to the scale action only")
        if bool(self.function) != (self.action == "lambda_invoke"):
            raise ValueError("function is required for lambda_invoke, and only there")
        return self

    def matches(self, trigger: ActionTrigger) -> bool:
        if trigger.event != (self.oec_action or "opened"):
            return False
        return all(
            trigger.labels.get(key) in ([wanted] if isinstance(wanted, str) else wanted)
            for key, wanted in self.labels.items()
        )


def rule_names(rules: Sequence[ActionRule]) -> list[str]:
    return [rule.name or f"rule-{n}" for n, rule in enumerate(rules, start=1)]


class ActionRules:
    """The :class:`~application.ports.ActionRunner`: the configured rules, acting through the adapters
    (None when disabled)."""

    def __init__(
        self,
        rules: Sequence[ActionRule],
        *,
        cluster: Cluster | None = None,
        cloud: Cloud | None = None,
        policy: IncidentPolicy = IncidentPolicy(),
        dry_run: bool = False,
    ) -> None:
        self._rules = list(zip(rule_names(rules), rules, strict=True))
        self._cluster = cluster
        self._cloud = cloud
        self._policy = policy
        self._dry_run = dry_run

    def plan(self, trigger: ActionTrigger) -> list[PlannedAction]:
        return [self._resolve(name, rule, trigger) for name, rule in self._rules if rule.matches(trigger)]

    async def run(self, action: PlannedAction, incident: Incident) -> str:
        if action.problem:
            raise PermanentError(action.problem)
        system = "kubernetes" if action.action in KUBERNETES_ACTIONS else "aws"
        if (self._cluster if system == "kubernetes" else self._cloud) is None:
            if not self._dry_run:
                raise PermanentError(f"{action.action} needs the {system} adapter, which is disabled")
            log.info("action.dry_run", rule=action.rule, action=action.action, target=action.target)
            return (
                f"would {action.action} {action.target} (dry run; {system} adapter disabled, nothing checked)"
            )
        return str(await self._call(action, incident))

    async def _call(self, action: PlannedAction, incident: Incident) -> object:
        args = action.arguments
        if action.action in KUBERNETES_ACTIONS:
            assert self._cluster is not None
            if action.action == "restart":
                return await self._cluster.rollout_restart(args["namespace"], args["name"])
            return await self._cluster.scale(args["namespace"], args["name"], int(args["replicas"]))
        assert self._cloud is not None
        if action.action == "ec2_reboot":
            return await self._cloud.reboot_instances(list(args["instance_ids"]))
        return await self._cloud.invoke_lambda(args["function"], _lambda_payload(action, incident))

    def _resolve(self, name: str, rule: ActionRule, trigger: ActionTrigger) -> PlannedAction:
        labels = trigger.labels
        if rule.action in KUBERNETES_ACTIONS:
            workload = self._policy.workload(labels)
            if workload is None:
                names = "/".join(self._policy.namespace_labels + self._policy.deployment_labels)
                return PlannedAction(
                    name, rule.action, "", problem=f"the event names no Deployment ({names})"
                )
            namespace, deployment = workload
            arguments: dict[str, Any] = {"namespace": namespace, "name": deployment}
            problem = ""
            if rule.action == "scale":
                replicas = rule.replicas if rule.replicas is not None else _count(labels.get(REPLICAS_LABEL))
                arguments["replicas"] = replicas
                if replicas is None:
                    problem = f"no replica count: set replicas on the rule or the {REPLICAS_LABEL} label"
            return PlannedAction(
                name, rule.action, f"deployment {namespace}/{deployment}", arguments, problem
            )
        if rule.action == "ec2_reboot":
            ids = sorted({i.strip() for i in labels.get(INSTANCE_LABEL, "").split(",") if i.strip()})
            problem = "" if ids else f"the event names no EC2 instance ({INSTANCE_LABEL} label)"
            return PlannedAction(name, rule.action, f"ec2 {','.join(ids)}", {"instance_ids": ids}, problem)
        return PlannedAction(name, rule.action, f"lambda {rule.function}", {"function": rule.function})


def _count(value: str | None) -> int | None:
    try:
        count = int(value) if value is not None else None
    except ValueError:
        return None
    return count if count is not None and count >= 0 else None


def _lambda_payload(action: PlannedAction, incident: Incident) -> Mapping[str, Any]:
    fields = ("id", "title", "service", "environment", "severity", "status", "dedup_key", "source")
    return {"rule": action.rule, "incident": incident.model_dump(mode="json", include=set(fields))}

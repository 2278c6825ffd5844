"""Action rules: what triggers them, what they resolve to, how they are validated, and dry-run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from application.actions import ActionRule, ActionRules
from application.errors import PermanentError
from application.incidents import Incident, IncidentPolicy
from application.ports import ActionResult, ActionTrigger, DeploymentStatus, Missing
from config.settings import SettingsError, load

LABELS = {"alertname": "HighErrorRate", "namespace": "shop", "deployment": "checkout"}


def rules(*specs: dict[str, Any], **options: Any) -> ActionRules:
    return ActionRules([ActionRule.model_validate(spec) for spec in specs], **options)


def incident() -> Incident:
    at = datetime(2026, 11, 23, 10, tzinfo=UTC)
    return Incident.open(at=at, actor="alertmanager", message_id="m", title="t", source="alertmanager",
                         dedup_key="alertmanager:1")  # fmt: skip


class RecordingCluster:
    """A Cluster fake that records the actions it was asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def namespace_exists(self, namespace: str) -> bool:
        return True

    async def deployment_status(self, namespace: str, name: str) -> DeploymentStatus | Missing:
        return Missing("Deployment", namespace, name)

    async def rollout_restart(self, namespace: str, name: str) -> ActionResult:
        self.calls.append(("restart", namespace, name))
        return ActionResult("rollout restart", f"deployment {namespace}/{name}", "restartedAt=now")

    async def scale(self, namespace: str, name: str, replicas: int) -> ActionResult:
        self.calls.append(("scale", namespace, name, replicas))
        return ActionResult("scale", f"deployment {namespace}/{name}", f"replicas 3 -> {replicas}")


def test_a_label_rule_answers_an_alert_opening_an_incident_and_an_oec_rule_its_action_name() -> None:
    """`labels` rules match "opened" triggers whose labels carry the values (one of a list); `oec_action`
    rules match that OEC action by name, narrowed by the alert's details."""
    runner = rules(
        {"name": "on-label", "labels": {"incidentd_action": ["restart", "bounce"]}, "action": "restart"},
        {"name": "on-oec", "oec_action": "restartDeployment", "action": "restart"},
        {
            "name": "oec-prod",
            "oec_action": "restartDeployment",
            "labels": {"env": "prod"},
            "action": "restart",
        },
    )
    labelled = {**LABELS, "incidentd_action": "bounce"}
    assert [p.rule for p in runner.plan(ActionTrigger("opened", labelled))] == ["on-label"]
    assert runner.plan(ActionTrigger("opened", LABELS)) == []
    assert runner.plan(ActionTrigger("Acknowledge", labelled)) == []
    assert [p.rule for p in runner.plan(ActionTrigger("restartDeployment", LABELS))] == ["on-oec"]
    both = runner.plan(ActionTrigger("restartDeployment", {**LABELS, "env": "prod"}))
    assert [p.rule for p in both] == ["on-oec", "oec-prod"]


def test_targets_come_from_the_configured_labels_and_a_missing_one_is_a_problem_not_a_guess() -> None:
    """The Deployment comes from the policy's label names; scale reads its count from the rule or the
    incidentd_replicas label; an event naming no Deployment plans an action that cannot run."""
    policy = IncidentPolicy(
        namespace_labels=("kubernetes_namespace", "namespace"), deployment_labels=("app",)
    )
    runner = rules(
        {"labels": {"incidentd_action": "scale"}, "action": "scale"},
        {"name": "fixed", "labels": {"incidentd_action": "scale"}, "action": "scale", "replicas": 5},
        policy=policy,
    )
    labels = {"incidentd_action": "scale", "kubernetes_namespace": "shop", "app": "checkout"}
    from_label, fixed = runner.plan(ActionTrigger("opened", {**labels, "incidentd_replicas": "7"}))
    assert (from_label.rule, from_label.target, from_label.arguments["replicas"]) == (
        "rule-1", "deployment shop/checkout", 7)  # fmt: skip
    assert (fixed.arguments["replicas"], fixed.problem) == (5, "")
    no_count, _ = runner.plan(ActionTrigger("opened", labels))
    assert "no replica count" in no_count.problem
    [nameless] = rules({"labels": {"x": "1"}, "action": "restart"}).plan(ActionTrigger("opened", {"x": "1"}))
    assert nameless.problem == "the event names no Deployment (namespace/deployment)"


async def test_running_calls_the_cluster_and_a_problem_is_a_permanent_error() -> None:
    """A planned restart calls the cluster's rollout restart; an action that cannot run raises
    PermanentError (the handlers record it as failed instead of retrying)."""
    cluster = RecordingCluster()
    runner = rules({"labels": {"incidentd_action": "restart"}, "action": "restart"}, cluster=cluster)
    [planned] = runner.plan(ActionTrigger("opened", {**LABELS, "incidentd_action": "restart"}))
    assert (
        await runner.run(planned, incident()) == "rollout restart deployment shop/checkout: restartedAt=now"
    )
    assert cluster.calls == [("restart", "shop", "checkout")]
    [broken] = runner.plan(ActionTrigger("opened", {"incidentd_action": "restart"}))
    with pytest.raises(PermanentError, match="names no Deployment"):
        await runner.run(broken, incident())


async def test_dry_run_without_the_adapter_reports_what_it_would_do() -> None:
    """With dry_run and the Kubernetes adapter off (the embedded example), a rule reports the action it
    would take, and nothing is called; without dry_run that is a permanent error."""
    spec = {"name": "restart", "labels": {"incidentd_action": "restart"}, "action": "restart"}
    trigger = ActionTrigger("opened", {**LABELS, "incidentd_action": "restart"})
    [planned] = rules(spec, dry_run=True).plan(trigger)
    result = await rules(spec, dry_run=True).run(planned, incident())
    assert (
        result
        == "would restart deployment shop/checkout (dry run; kubernetes adapter disabled, nothing checked)"
    )
    with pytest.raises(PermanentError, match="needs the kubernetes adapter"):
        await rules(spec).run(planned, incident())


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"action": "restart"}, "needs oec_action or labels"),
        ({"labels": {"a": "b"}, "action": "restart", "replicas": 2}, "replicas applies to the scale action"),
        ({"labels": {"a": "b"}, "action": "lambda_invoke"}, "function is required"),
        ({"labels": {"a": "b"}, "action": "reboot"}, "Input should be"),
        ({"labels": {"a": "b"}, "action": "restart", "name": "a:b"}, "String should match"),
        ({"labels": {"a": "b"}, "action": "restart", "when": "always"}, "Extra inputs"),
    ],
)
def test_a_bad_rule_is_refused(spec: dict[str, Any], error: str) -> None:
    """Rules are validated when the settings load: each mistake is named."""
    with pytest.raises(ValidationError, match=error):
        ActionRule.model_validate(spec)


def test_settings_refuse_a_rule_whose_adapter_is_off_unless_dry_run() -> None:
    """action_rules is checked at start-up: a restart rule needs kubernetes_enabled (or dry_run), and
    rule names are unique; the error names the setting."""
    rule = {"labels": {"incidentd_action": "restart"}, "action": "restart"}
    with pytest.raises(
        SettingsError, match=r"INCIDENTD_ACTION_RULES .*'rule-1' \(restart\) needs kubernetes_enabled"
    ):
        load(action_rules=[rule])
    assert load(action_rules=[rule], dry_run=True).action_rules[0].action == "restart"
    assert load(action_rules=[rule], kubernetes_enabled=True).action_rules[0].action == "restart"
    with pytest.raises(SettingsError, match="rule names must be unique"):
        load(action_rules=[{**rule, "name": "x"}, {**rule, "name": "x"}], dry_run=True)


class RecordingCloud:
    """A Cloud fake for the two AWS actions."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def reboot_instances(self, instance_ids: Any) -> ActionResult:
        self.calls.append(("reboot", list(instance_ids)))
        return ActionResult("reboot", f"ec2 {','.join(instance_ids)}")

    async def invoke_lambda(self, function: str, payload: Any) -> ActionResult:
        self.calls.append(("lambda", function, dict(payload)))
        return ActionResult("invoke", f"lambda {function}", "queued")


async def test_aws_actions_reboot_the_instances_the_labels_name_and_invoke_the_rules_function() -> None:
    """ec2_reboot takes its instances from the instance_id label (comma-separated); lambda_invoke sends
    the rule's function the incident (id, title, service, severity, ...) and the rule's name."""
    cloud = RecordingCloud()
    runner = rules(
        {"name": "reboot", "labels": {"incidentd_action": "reboot"}, "action": "ec2_reboot"},
        {"name": "page-bot", "labels": {"incidentd_action": "reboot"}, "action": "lambda_invoke",
         "function": "ops-bot"},
        cloud=cloud,
    )  # fmt: skip
    reboot, invoke = runner.plan(
        ActionTrigger("opened", {"incidentd_action": "reboot", "instance_id": "i-2, i-1"})
    )
    subject = incident()
    assert await runner.run(reboot, subject) == "reboot ec2 i-1,i-2"
    assert await runner.run(invoke, subject) == "invoke lambda ops-bot: queued"
    [(_, ids), (_, function, payload)] = cloud.calls
    assert (ids, function, payload["rule"]) == (["i-1", "i-2"], "ops-bot", "page-bot")
    assert payload["incident"]["id"] == str(subject.id) and payload["incident"]["status"] == "open"

"""Opening the analysis side effect from the ``ai_*`` settings (docs/ai.md).

Only the configured model's client is imported: a worker on an OpenAI-compatible endpoint never loads
aioboto3, and one on Bedrock never creates an HTTP session it does not use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from application.analysis import Analysis, AnalysisPolicy

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from application.ports import Broker
    from config.settings import Settings
    from infra.ai.bedrock import BedrockConverse
    from infra.ai.openai import OpenAIChat


@asynccontextmanager
async def open_analysis(
    settings: Settings, broker: Broker, registry: CollectorRegistry
) -> AsyncIterator[Analysis]:
    """The configured model, the runbook index and the analysis policy; requests are published through
    ``broker`` and counted on ``registry``. The model's client is closed on exit."""
    from infra.ai.knowledge import RunbookIndex
    from infra.ai.metrics import AnalysisMetrics

    analyst = _analyst(settings)
    policy = AnalysisPolicy(
        min_severity=settings.ai_min_severity, token_budget=settings.ai_token_budget,
        max_output_tokens=settings.ai_max_output_tokens, max_per_hour=settings.ai_max_per_hour,
        top_k=settings.ai_top_k, history=settings.ai_history, timeout=settings.ai_timeout,
    )  # fmt: skip
    try:
        yield Analysis(analyst, RunbookIndex(settings.ai_knowledge_dir), broker.publisher, policy,
                       observer=AnalysisMetrics(registry))  # fmt: skip
    finally:
        await analyst.close()


def _analyst(settings: Settings) -> BedrockConverse | OpenAIChat:
    """The chat model ``ai_provider`` names. The HTTP session is created here, inside the running loop
    (an aiohttp session belongs to one)."""
    if settings.ai_provider == "bedrock":
        from infra.ai.bedrock import BedrockConverse

        return BedrockConverse(
            model=settings.ai_model, region=settings.ai_region, endpoint_url=settings.ai_endpoint_url,
            timeout=settings.ai_timeout,
        )  # fmt: skip
    import aiohttp

    from infra.ai.openai import OpenAIChat
    from infra.secrets import read_secret

    api_key = read_secret(settings.ai_api_key, settings.ai_api_key_file)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.ai_timeout))
    return OpenAIChat(session, base_url=settings.ai_base_url, model=settings.ai_model, api_key=api_key,
                      json_mode=settings.ai_json_mode)  # fmt: skip

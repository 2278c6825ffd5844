"""AI analysis adapters (docs/ai.md): the runbook knowledge base and the chat-model clients.

Imported only when ``INCIDENTD_AI_ENABLED`` is set: bm25s (numpy), aioboto3 and the HTTP client load with
the module that needs them, never with this package.
"""

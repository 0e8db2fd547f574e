"""LLM backends behind one interface (`LLMClient.complete(messages, schema) -> LLMReply`).

Light to import: each backend's SDK / model is imported only when that backend is built (see factory).
"""

from .base import LLMClient, LLMError, LLMReply, Message
from .factory import make_client, parse_spec, resolve_auto
from .replay import ReplayClient, ReplayDivergence
from .retry import RetryPolicy, redact
from .scripted import ScriptedClient

__all__ = [
    "LLMClient", "LLMError", "LLMReply", "Message", "make_client", "parse_spec", "resolve_auto",
    "ReplayClient", "ReplayDivergence", "RetryPolicy", "redact", "ScriptedClient",
]

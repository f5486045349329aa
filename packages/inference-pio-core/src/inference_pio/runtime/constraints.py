"""Constrained decoding: every token a request draws is one its grammar allows.

We use llguidance (a Rust engine with Python bindings, no torch dependency of its own): it compiles
JSON schemas (with ``strict``), regular expressions and Lark grammars (which may embed JSON schemas,
what tool-call formats need) against the model's tokenizer, and computes the allowed-token mask of
one step in tens of microseconds on the CPU while the device works. xgrammar would do too, but it
pins its own torch range, which a plugin distribution cannot afford; llguidance has no such pin.

A request carries its grammar as the serialized grammar llguidance produces (``json_schema_grammar``,
``lark_grammar``), a plain string, so parameters stay torch- and llguidance-free; this module imports
torch only where masks are applied, so the torch-free server can build grammars. The scheduler keeps
one matcher per constrained request; the masks of a step are applied to the logits on the device,
constrained and unconstrained requests share the step.

Random or weak weights can wander inside a string or a number until the token budget is spent, which
would end a JSON answer unparsable. So near the end of its budget a constrained request closes what it
has open. It measures, by walking a copy of its matcher, how many tokens that takes, and starts in
time; each closing step takes, among the allowed tokens of a fixed list (``"``, ``}``, ``]``, ``0``,
``null`` ...), the one that leads to the most constrained state (the grammar accepting, else the fewest
allowed next tokens: structure rather than free text), or what the grammar forces (a required key).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from inference_pio.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

LOOKAHEAD = 128
"""Within this many tokens of its budget's end, a constrained request measures what closing up would take."""
MARGIN = 8
"""...and starts closing when its remaining budget is that length plus this margin."""
_CLOSERS = ('"}', '"]', "}", "]", '"', "0", "null", "true", "[]", "{}", '""', ",", "\n", " ")
"""Closing tokens of JSON (and the whitespace formats put between tags); the tokenizer's added tokens
(tags) and end-of-sequence join them."""


def json_schema_grammar(schema: Mapping[str, Any] | None) -> str:
    """The grammar of JSON matching ``schema``; ``None`` means any JSON object (``json_object`` mode)."""
    import llguidance

    target = {"type": "object"} if schema is None else dict(schema)
    compact: Any = {"whitespace_flexible": False}  # a TypedDict of llguidance's; whitespace cannot eat the budget
    try:
        grammar = str(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(target), overrides=compact))
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError, RuntimeError) as exc:
        error = str(exc)
    if error:
        message = f"the JSON schema cannot be used for constrained decoding: {error}"
        raise InvalidRequestError(message, "response_format")
    return grammar


def lark_grammar(text: str) -> str:
    """The grammar of a Lark description (which may embed ``%json{...}`` schemas, as tool-call formats do)."""
    import llguidance

    grammar = str(llguidance.LLMatcher.grammar_from_lark(text))
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"the grammar cannot be used for constrained decoding: {error}", "grammar")
    return grammar


class Constraints:
    """Per-scheduler grammar machinery: the llguidance tokenizer (built on first use, ~1 s) and masks."""

    def __init__(self, tokenizer: Any, vocab: int, eos_ids: frozenset[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab = vocab
        self._eos = sorted(eos_ids)
        self._tokenizer: Any = None
        self._closers: list[int] = []
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab, eos_token=self._eos or None
                )
                closers = list(self._eos)  # a complete answer ends rather than going on
                for text in _CLOSERS:
                    ids = self._hf_tokenizer.encode(text, add_special_tokens=False)
                    if len(ids) == 1:
                        closers.append(int(ids[0]))
                # Added tokens close the tags of tool-call formats (</arg_value>, </tool_call>); grammars allow
                # them only where they name them, so trying them all is cheap.
                closers += sorted(int(i) for i in self._hf_tokenizer.get_added_vocab().values() if i < self.vocab)
                self._closers = list(dict.fromkeys(closers))
            return self._tokenizer

    def matcher(self, grammar: str) -> Any:
        """A matcher for one request; a grammar llguidance refuses is the caller's error."""
        import llguidance

        matcher = llguidance.LLMatcher(self._ll_tokenizer(), grammar)
        if matcher.is_error():
            raise InvalidRequestError(f"the output constraint is invalid: {matcher.get_error()}", "response_format")
        return matcher

    def mask(self, matchers: list[Any], device: torch.device) -> torch.Tensor:
        """Allowed tokens ``[len(matchers), vocab]`` (bool, on ``device``) for the next step of each matcher."""
        import llguidance.numpy
        import torch

        words = (self.vocab + 31) // 32
        bits = llguidance.numpy.allocate_token_bitmask(len(matchers), self.vocab)
        for i, matcher in enumerate(matchers):
            llguidance.numpy.fill_next_token_bitmask(matcher, bits, i)
        packed = torch.from_numpy(bits).to(device)  # [n, words] int32, one H2D copy per step
        shifts = torch.arange(32, device=device, dtype=torch.int32)
        allowed = ((packed[:, :, None] >> shifts) & 1).bool().reshape(len(matchers), words * 32)
        return allowed[:, : self.vocab]

    def best_closer(self, matcher: Any) -> int:
        """The allowed closing token that leads to the most constrained state: the grammar accepting (an
        accepting grammar takes end-of-sequence), else the fewest allowed next tokens (structure, not free
        text), else what the grammar forces; -1 when nothing fits."""
        self._ll_tokenizer()  # the closing tokens are found with the tokenizer
        return self._best_closer(matcher)

    def _best_closer(self, matcher: Any) -> int:
        best, best_score = -1, float("inf")
        for token in self._closers:
            if matcher.try_consume_tokens([token]) != 1:
                continue
            if matcher.is_accepting() or matcher.is_stopped():
                score = -1
            else:
                score = int.from_bytes(matcher.compute_bitmask(), "little").bit_count()
            matcher.rollback(1)
            if score < best_score:
                best, best_score = token, score
        if best < 0:  # no closing token fits (a required key, a bounded number): what the grammar forces,
            forced = matcher.compute_ff_tokens()  # else the first token it allows
            best = int(forced[0]) if forced else _first_allowed(matcher.compute_bitmask())
        return best

    def closing_length(self, matcher: Any, limit: int = LOOKAHEAD) -> int:
        """How many tokens closing up from ``matcher``'s state takes (``limit`` if it does not finish)."""
        self._ll_tokenizer()
        probe = matcher.deep_copy()
        for steps in range(limit):
            if probe.is_accepting() or probe.is_stopped():
                return steps
            token = self._best_closer(probe)
            if token < 0 or not probe.consume_token(token):
                return limit
        return limit


def _first_allowed(bitmask: bytes) -> int:
    """The lowest token id set in an llguidance bitmask, -1 if none is."""
    value = int.from_bytes(bitmask, "little")
    return (value & -value).bit_length() - 1 if value else -1


def apply_constraints(logits: torch.Tensor, rows: list[int], allowed: torch.Tensor, forced: list[int]) -> torch.Tensor:
    """``logits`` with disallowed tokens at ``-inf`` in ``rows``; a row with a forced token (``>= 0``, a
    closing token) keeps only that one."""
    import torch

    out = logits.clone()
    index = torch.tensor(rows, device=logits.device)
    masked = logits[index].masked_fill(~allowed, float("-inf"))
    for j, token in enumerate(forced):
        if token >= 0:
            masked[j] = float("-inf")
            masked[j, token] = 0.0
    out[index] = masked
    return out

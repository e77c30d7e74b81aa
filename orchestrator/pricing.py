"""Per-model prices (USD per million tokens), context windows, and the cost of a usage.

Prices are Anthropic's list prices: input, output, 5-minute cache write (1.25x input) and cache read (0.1x input).
A model not in the table is priced at the most expensive tier (``FALLBACK``) and flagged, never silently $0.
Every current Claude model has a 200,000-token context window (input + ``max_tokens``); the fleet's
``context_window_tokens`` setting overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CONTEXT_WINDOW = 200_000


@dataclass(frozen=True)
class Price:
    """USD per million tokens, and the model's context window in tokens."""

    input: float
    output: float
    cache_write: float
    cache_read: float
    context_window: int = DEFAULT_CONTEXT_WINDOW


def _tier(input_price: float, output_price: float, context_window: int = DEFAULT_CONTEXT_WINDOW) -> Price:
    return Price(input_price, output_price, input_price * 1.25, input_price * 0.1, context_window)


OPUS_TIER = _tier(5.0, 25.0)
OPUS_LEGACY_TIER = _tier(15.0, 75.0)
SONNET_TIER = _tier(3.0, 15.0)
HAIKU_TIER = _tier(1.0, 5.0)
FALLBACK = OPUS_LEGACY_TIER  # unknown models: priced high on purpose, so budgets err on the safe side

PRICES: dict[str, Price] = {
    "claude-opus-5-5": OPUS_TIER,
    "claude-opus-5": OPUS_TIER,
    "claude-opus-4-8": OPUS_TIER,
    "claude-opus-4-7": OPUS_TIER,
    "claude-opus-4-6": OPUS_TIER,
    "claude-opus-4-5": OPUS_TIER,
    "claude-opus-4-1": OPUS_LEGACY_TIER,
    "claude-opus-4-0": OPUS_LEGACY_TIER,
    "claude-sonnet-5-5": SONNET_TIER,
    "claude-sonnet-5": SONNET_TIER,
    "claude-sonnet-4-6": SONNET_TIER,
    "claude-sonnet-4-5": SONNET_TIER,
    "claude-sonnet-4-0": SONNET_TIER,
    "claude-haiku-5-5": HAIKU_TIER,
    "claude-haiku-4-5": HAIKU_TIER,
}


def price_for(model: str) -> tuple[Price, bool]:
    """The price of a model and whether it is known; dated ids (``-20251001``) match their family."""
    if model in PRICES:
        return PRICES[model], True
    head, _, tail = model.rpartition("-")
    base = head if tail.isdigit() and len(tail) == 8 else model
    if base in PRICES:
        return PRICES[base], True
    return FALLBACK, False


def context_window_for(model: str, override: int | None = None) -> int:
    """Tokens of input plus ``max_tokens`` one call of ``model`` may hold (``override``: the fleet's setting)."""
    return override or price_for(model)[0].context_window


def cost_micro_usd(model: str, input_tokens: int, output_tokens: int, cache_write: int, cache_read: int) -> int:
    """Cost in integer micro-dollars (so counters never drift)."""
    price, _ = price_for(model)
    total = (
        input_tokens * price.input
        + output_tokens * price.output
        + cache_write * price.cache_write
        + cache_read * price.cache_read
    )
    return round(total)  # tokens x USD-per-million = micro-dollars

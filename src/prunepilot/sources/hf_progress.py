"""transformers' own progress bars, switched off around our calls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def hf_progress_off() -> Iterator[None]:
    """transformers' own tqdm bars (loading, writing shards) off for the duration: they would break into our
    progress lines and logs. The user's setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()

"""Fixtures for the data tests: the default model's real tokenizer (no model weights)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from qlora.models import ModelLoadError, resolve_checkpoint


@pytest.fixture(scope="session")
def tok() -> Any:
    """SmolLM2-135M-Instruct's tokenizer (ChatML template, pad = eos = <|im_end|>)."""
    transformers = pytest.importorskip("transformers")
    try:
        path = resolve_checkpoint("smollm2-135m")
    except ModelLoadError as err:
        pytest.skip(str(err))
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)


@pytest.fixture(scope="session")
def plain_tok(tok: Any) -> Any:
    """The same tokenizer without a chat template: the plain template is used."""
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain

"""Generation sees exactly the prompt ids training put before each response.

Two tokenizers built here (no download): a byte-level BPE with a ChatML chat template, and the
same without one (the plain template) whose tokenizer adds a BOS token by default, so that a
prompt tokenized with special tokens would differ from training's encoding.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

from qlora.data import IGNORE_INDEX, encode_record
from qlora.generate import chat_loop, generate_text

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "### System:\nBe brief.\n\n### User:\nWhat is the capital of France?\n\n### Assistant:\n",
    "<|im_start|>user\nWhat is the capital of Italy?<|im_end|>\n<|im_start|>assistant\nRome.",
    "Paris. Rome. And Berlin? Thanks, bye.",
]
SINGLE = [{"role": "user", "content": "What is the capital of France?"}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "And France?"},
]


def _build(chat_template: str | None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS * 4, trainer)
    # tokenizer(text) adds <s>, as Llama's does; training never asks for special tokens.
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    eos = "<|im_end|>" if chat_template else "</s>"
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token=eos, pad_token=eos
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module", params=["chat-template", "plain-template"])
def tok(request: pytest.FixtureRequest) -> Any:
    return _build(CHATML if request.param == "chat-template" else None)


class Recorder(nn.Module):
    """Stands in for a causal LM: records the prompt ids, answers "Paris." and EOS."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.reply = [*tokenizer("Paris.", add_special_tokens=False)["input_ids"]]
        self.reply.append(tokenizer.eos_token_id)
        self.prompts: list[list[int]] = []

    def generate(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:  # [1, T] -> [1, T+n]
        self.prompts.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.tensor([self.reply])], dim=1)


def _training_prompt(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """Training's ids for ``messages`` + a reply, up to the reply's first (labeled) token."""
    record = {"messages": [*messages, {"role": "assistant", "content": "Paris."}]}
    [example] = encode_record(tok, record, "chat", max_seq_len=4096)
    labels = example.labels
    # The reply is the last run of labeled tokens; the prompt is everything before it.
    start = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    while labels[start - 1] != IGNORE_INDEX:
        start -= 1
    assert tok.decode(example.input_ids[start:]).startswith("Paris.")
    return example.input_ids[:start]


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_generation_prompt_ids_equal_training_prompt_ids(
    tok: Any, messages: list[dict[str, str]]
) -> None:
    model = Recorder(tok)
    reply = generate_text(model, tok, messages, max_new_tokens=8)
    assert reply.strip() == "Paris."
    assert model.prompts == [_training_prompt(tok, messages)]
    from qlora.data.prompt import prompt_ids  # the one function eval and the server use too

    assert prompt_ids(tok, messages) == model.prompts[0]


def test_chat_history_is_encoded_as_training_encodes_it(tok: Any) -> None:
    model = Recorder(tok)
    out = io.StringIO()
    history = chat_loop(
        model, tok, ["What is the capital of Italy?", "And France?"], write=out.write, out=out
    )
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert model.prompts[1] == _training_prompt(tok, history[:3])


def test_raw_is_the_text_as_training_encodes_text_records(tok: Any) -> None:
    model = Recorder(tok)
    text = "Paris. Rome. And Berlin?"
    generate_text(model, tok, [{"role": "user", "content": text}], raw=True)
    [example] = encode_record(tok, {"text": text}, "text", max_seq_len=4096)
    assert model.prompts == [example.input_ids[:-1]]  # the text's ids, without the EOS
    assert tok.bos_token_id not in model.prompts[0]


def test_empty_raw_prompt_is_a_clear_error(tok: Any) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_text(Recorder(tok), tok, [{"role": "user", "content": ""}], raw=True)

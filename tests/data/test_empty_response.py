"""An empty response is a valid example (real Alpaca has them): it is trained on, its only
labels are the end-of-response tokens, and the data summary counts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qlora.config import DataConfig
from qlora.data import IGNORE_INDEX, encode_record, load_data, read_records, write_jsonl

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["say", "nothing", "hi", "hello", "please", "ok", "###", "User", "Assistant", ":"]


def tiny_tokenizer(chat_template: str | None) -> Any:
    """A word-level tokenizer with ChatML's markers (EOS = <|im_end|>) and an optional template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>", *WORDS])}
    vocab |= {role: len(vocab) + i for i, role in enumerate(("user", "assistant", "system"))}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=inner,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def labeled(example: Any) -> list[int]:
    return [label for label in example.labels if label != IGNORE_INDEX]


@pytest.mark.parametrize("template", [CHATML, None], ids=["chat-template", "plain"])
def test_an_empty_alpaca_output_labels_only_the_end_of_response(template: str | None) -> None:
    tok = tiny_tokenizer(template)
    eos = tok.eos_token_id
    [empty] = encode_record(tok, {"instruction": "say nothing", "output": ""}, "alpaca", 64)
    assert labeled(empty) == [eos]
    [spoken] = encode_record(tok, {"instruction": "say nothing", "output": "hi"}, "alpaca", 64)
    assert labeled(spoken) == [tok.convert_tokens_to_ids("hi"), eos]
    # The same prompt as for any other answer, then the end of the response at once.
    n_prompt = empty.labels.index(eos)
    assert empty.input_ids[:n_prompt] == spoken.input_ids[:n_prompt]
    assert empty.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert empty.input_ids[n_prompt] == eos


def test_an_empty_final_assistant_turn_is_a_say_nothing_example() -> None:
    tok = tiny_tokenizer(CHATML)
    chat = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "say nothing"},
            {"role": "assistant", "content": ""},
        ]
    }
    [example] = encode_record(tok, chat, "chat", 64)
    hello, eos = tok.convert_tokens_to_ids("hello"), tok.eos_token_id
    assert labeled(example) == [hello, eos, eos]


def test_empty_responses_are_kept_and_counted_in_the_summary(tmp_path: Path) -> None:
    records = [
        {"instruction": "say hi", "output": "hi"},
        {"instruction": "say nothing", "output": ""},
        {"instruction": "say nothing please", "input": "ok", "output": "  "},
        {"instruction": "say hello", "output": "hello"},
    ]
    path = write_jsonl(records, tmp_path / "alpaca.jsonl")
    read = read_records(path)  # the default, on_bad_record="error", accepts them
    assert len(read) == 4 and read.n_empty_responses == 2
    assert read.summary() == f"{path}: 4 alpaca records (2 with an empty response)"
    chat = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
    ]
    assert read_records(write_jsonl(chat, tmp_path / "chat.jsonl")).n_empty_responses == 1

    bundle = load_data(DataConfig(path=str(path), eval_fraction=0.0), tiny_tokenizer(CHATML))
    assert len(bundle.train) == 4
    assert "(2 with an empty response)" in bundle.summary()

"""Rendering and tokenization: exact prompt/response boundaries, masking, truncation."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from qlora.data import (
    IGNORE_INDEX,
    DataError,
    EncodeReport,
    encode_record,
    encode_records,
    record_messages,
    render,
    render_prompt,
    segments,
)

ALPACA = {"instruction": "Reverse the order of these words.", "input": "a b c", "output": "c b a"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": " 1, 2,3 "},
        {"role": "user", "content": "Thanks"},
    ]
}


def labeled(tok: Any, labels: list[int]) -> str:
    return tok.decode([label for label in labels if label != IGNORE_INDEX])


def test_alpaca_becomes_user_and_assistant_messages() -> None:
    assert record_messages(ALPACA, "alpaca") == [
        {"role": "user", "content": "Reverse the order of these words.\n\na b c"},
        {"role": "assistant", "content": "c b a"},
    ]
    no_input = {"instruction": "Say hi.", "input": "", "output": "hi", "system": "S"}
    assert record_messages(no_input, "alpaca") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
    ]


def test_alpaca_labels_are_exactly_the_response_and_eos(tok: Any) -> None:
    [example] = encode_record(tok, ALPACA, "alpaca", max_seq_len=512)
    assert labeled(tok, example.labels) == "c b a" + tok.eos_token
    # Prompt tokens masked, response tokens labeled, then the template's trailing newline.
    prompt = tok(render_prompt(tok, record_messages(ALPACA, "alpaca")), add_special_tokens=False)
    n_prompt = len(prompt["input_ids"])
    assert example.input_ids[:n_prompt] == prompt["input_ids"]
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:-1] == example.input_ids[n_prompt:-1]
    assert example.input_ids[-2] == tok.eos_token_id
    assert example.labels[-1] == IGNORE_INDEX  # "\n" after <|im_end|>: framing, not learned


def test_ids_equal_the_chat_templates_own_tokenization(tok: Any) -> None:
    for record, fmt in ((ALPACA, "alpaca"), (CHAT, "chat")):
        [example] = encode_record(tok, record, fmt, max_seq_len=512)
        messages = record_messages(record, fmt)
        if fmt == "chat":
            messages = messages[:-1]  # trailing user turn: no loss, dropped
        reference = tok.apply_chat_template(messages, tokenize=True)
        reference = reference if isinstance(reference, list) else reference["input_ids"]
        assert example.input_ids == list(reference)


def test_multi_turn_chat_labels_every_assistant_turn(tok: Any) -> None:
    [example] = encode_record(tok, CHAT, "chat", max_seq_len=512)
    eos = tok.eos_token
    assert labeled(tok, example.labels) == f"Hello!{eos} 1, 2,3 {eos}"
    # Each labeled run starts right after a generation prompt, exactly.
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    assert [tok.decode(r) for r in runs] == [f"Hello!{eos}", f" 1, 2,3 {eos}"]


def test_segments_join_to_the_full_rendering(tok: Any) -> None:
    messages = record_messages(CHAT, "chat")[:5]
    parts = segments(tok, messages)
    assert "".join(p.text for p in parts) == render(tok, messages)
    assert [p.response for p in parts] == [False, True, False, True]
    assert parts[1].text == "Hello!<|im_end|>\n"


def test_train_on_prompt_labels_everything(tok: Any) -> None:
    [example] = encode_record(tok, ALPACA, "alpaca", max_seq_len=512, train_on_prompt=True)
    assert example.labels == example.input_ids


def test_plain_template_without_chat_template(plain_tok: Any) -> None:
    [example] = encode_record(plain_tok, CHAT, "chat", max_seq_len=512)
    text = plain_tok.decode(example.input_ids)
    eos = plain_tok.eos_token
    assert text == (
        f"### System:\nBe brief.\n\n### User:\nHi there\n\n### Assistant:\nHello!{eos}"
        f"\n\n### User:\nCount to three.\n\n### Assistant:\n 1, 2,3 {eos}"
    )
    assert labeled(plain_tok, example.labels) == f"Hello!{eos} 1, 2,3 {eos}"
    prompt = render_prompt(plain_tok, record_messages(ALPACA, "alpaca"))
    assert prompt == "### User:\nReverse the order of these words.\n\na b c\n\n### Assistant:\n"


def test_truncation_is_counted(tok: Any) -> None:
    long = dict(ALPACA, output=" ".join(["word"] * 200))
    report = EncodeReport()
    [example] = encode_record(tok, long, "alpaca", max_seq_len=64, report=report)
    assert len(example) == 64
    assert report.n_truncated == 1
    examples, report = encode_records(tok, [ALPACA, long, long], 64, fmt="alpaca")
    assert (len(examples), report.n_truncated, report.n_dropped) == (3, 2, 0)
    assert "2 truncated" in report.summary()


def test_prompt_longer_than_max_seq_len_is_dropped_and_counted(tok: Any) -> None:
    long_prompt = dict(ALPACA, input=" ".join(["word"] * 200))
    examples, report = encode_records(tok, [long_prompt, ALPACA], 64, fmt="alpaca")
    assert len(examples) == 1
    assert (report.n_truncated, report.n_dropped, report.dropped) == (1, 1, ["record 0"])


def test_text_is_all_labels_and_split_into_chunks(tok: Any) -> None:
    record = {"text": " ".join(f"w{i}" for i in range(100))}
    ids = [*tok(record["text"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
    examples, report = encode_records(tok, [record], 32, fmt="text")
    assert [len(e) for e in examples[:-1]] == [32] * (len(examples) - 1)
    assert list(itertools.chain.from_iterable(e.input_ids for e in examples)) == ids
    assert all(e.labels == e.input_ids for e in examples)
    assert (report.n_split, report.n_examples, report.n_truncated) == (1, len(examples), 0)


def test_template_that_rewrites_history_is_refused(tok: Any) -> None:
    # A template that prints only the last turn: renderings are not prefixes of each other.
    odd = copy.deepcopy(tok)
    odd.chat_template = (
        "{{ messages[-1]['role'] + ': ' + messages[-1]['content'] + '\n' }}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-stable"):
        encode_record(odd, CHAT, "chat", max_seq_len=512)

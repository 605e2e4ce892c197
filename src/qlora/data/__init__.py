"""Training data: records (alpaca | chat | text) -> token ids + labels -> batches.

Pipeline (one direction; each step keeps a report of what it dropped or cut)::

    read_records(path)            JSON list or JSONL, validated; DataError names file + line
      -> split_eval(...)           seeded eval fraction (or a separate eval file)
      -> encode_records(tok, ...)  chat template, -100 on prompt tokens, truncation
      -> pack_examples(...)        optional: several examples per sequence
      -> BatchLoader(...)          padding collate, length grouping, resumable cursor

`load_data(DataConfig, tokenizer)` runs all of it. `qlora.data.tasks` holds the demo task
(word reversal) and exact-match scoring.
"""

from qlora.data.batching import (
    BatchLoader,
    DataCursor,
    batch_indices,
    collate,
    length_grouped_batches,
    pad_id_of,
)
from qlora.data.dataset import DataBundle, load_data
from qlora.data.encode import (
    IGNORE_INDEX,
    EncodeReport,
    Example,
    encode_record,
    encode_records,
    eos_id,
)
from qlora.data.packing import (
    block_diagonal_mask,
    pack_examples,
    packed_position_ids,
    packing_efficiency,
)
from qlora.data.prompt import prompt_ids, text_ids
from qlora.data.records import (
    DataError,
    RecordSet,
    detect_format,
    has_empty_response,
    read_records,
    validate_record,
)
from qlora.data.render import (
    PLAIN_TEMPLATE,
    Segment,
    has_chat_template,
    record_messages,
    render,
    render_prompt,
    segments,
)
from qlora.data.split import split_eval
from qlora.data.tasks import (
    TaskScore,
    exact_match,
    generate_answers,
    make_task_dataset,
    score,
    write_jsonl,
)

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "BatchLoader",
    "DataBundle",
    "DataCursor",
    "DataError",
    "EncodeReport",
    "Example",
    "RecordSet",
    "Segment",
    "TaskScore",
    "batch_indices",
    "block_diagonal_mask",
    "collate",
    "detect_format",
    "encode_record",
    "encode_records",
    "eos_id",
    "exact_match",
    "generate_answers",
    "has_chat_template",
    "has_empty_response",
    "length_grouped_batches",
    "load_data",
    "make_task_dataset",
    "pack_examples",
    "packed_position_ids",
    "packing_efficiency",
    "pad_id_of",
    "prompt_ids",
    "read_records",
    "record_messages",
    "render",
    "render_prompt",
    "score",
    "segments",
    "split_eval",
    "text_ids",
    "validate_record",
    "write_jsonl",
]

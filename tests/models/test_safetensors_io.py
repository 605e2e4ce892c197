"""Our streaming safetensors reader/writer against the reference `safetensors` library."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora.models.safetensors_io import SafetensorsError, SafetensorsReader, write_safetensors

TENSORS = {
    "a.weight": torch.randn(3, 5),
    "b.bias": torch.randn(7).bfloat16(),
    "c.half": torch.randn(2, 2, 2).half(),
    "d.codes": torch.randint(0, 255, (11,), dtype=torch.uint8),
    "e.index": torch.arange(4, dtype=torch.int64),
    "f.empty": torch.zeros(0, 4),
    "g.scalar": torch.tensor(3.5),
}


def test_reader_reads_what_safetensors_writes(tmp_path: Path) -> None:
    path = tmp_path / "ref.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt"})
    with SafetensorsReader(path) as reader:
        assert set(reader.names()) == set(TENSORS)
        assert reader.metadata == {"format": "pt"}
        for name, expected in TENSORS.items():
            got = reader.get(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got.clone(), expected), name
            reader.release(name)


def test_writer_output_is_read_by_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, TENSORS)
    loaded = load_file(path)
    for name, expected in TENSORS.items():
        assert torch.equal(loaded[name], expected), name
    assert not (tmp_path / "ours.safetensors.tmp").exists()


def test_streaming_writer_with_specs_and_mismatch(tmp_path: Path) -> None:
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in TENSORS.items()]
    write_safetensors(tmp_path / "s.safetensors", iter(TENSORS.items()), specs=specs)
    assert torch.equal(load_file(tmp_path / "s.safetensors")["b.bias"], TENSORS["b.bias"])
    bad = iter([("a.weight", torch.randn(3, 6))])
    with pytest.raises(ValueError, match=r"expected a\.weight .* got a\.weight"):
        write_safetensors(tmp_path / "bad.safetensors", bad, specs=specs[:1])
    assert not (tmp_path / "bad.safetensors").exists()  # nothing half-written under the name


def test_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SafetensorsError, match="no such file"):
        SafetensorsReader(tmp_path / "missing.safetensors")
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="too short"):
        SafetensorsReader(path)
    save_file({"x": torch.randn(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(SafetensorsError, match=r"tensor 'x' needs bytes up to \d+ .* truncated"):
        SafetensorsReader(path)
    header = b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(SafetensorsError, match="do not match shape"):
        SafetensorsReader(path)
    header = b'{"x":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(SafetensorsError, match="unsupported dtype 'Q4'"):
        SafetensorsReader(path)


def _with_header(path: Path, header: bytes, data: int = 16) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(data))
    return path


@pytest.mark.parametrize(
    ("header", "pattern"),
    [
        (b'{"x":{"dtype":"F32","shape":[-1,-4],"data_offsets":[0,16]}}', r"shape \[-1, -4\]"),
        (b'{"x":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}', r"non-negative integers"),
        (b'{"x":{"dtype":"F32","shape":[2.0,2],"data_offsets":[0,16]}}', r"shape \[2\.0, 2\]"),
        (b'{"x":{"dtype":"F32","shape":"4","data_offsets":[0,16]}}', r"shape '4' is not"),
        (b'{"x":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', r"shape \[True\]"),
        (b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}', r"0 <= begin <= end"),
        (b'{"x":{"dtype":"F32","shape":[0],"data_offsets":[-4,-4]}}', r"data_offsets \[-4, -4\]"),
        (b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,"16"]}}', r"data_offsets \[0, '16'\]"),
        (b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16,32]}}', r"\[begin, end\]"),
        (b'{"x":{"dtype":["F32"],"shape":[4],"data_offsets":[0,16]}}', r"unsupported dtype"),
        (b'{"x":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}}', r"truncated"),
        (b'{"x":[1,2]}', r"malformed header entry"),
        (b'{"__metadata__":{"format":1}}', r"__metadata__ must map strings to strings"),
        (b'{"__metadata__":"pt"}', r"__metadata__ must map strings to strings"),
        (
            b'{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},'
            b'"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
            r"tensor 'y' overlaps tensor 'x'",
        ),
    ],
    ids=[
        "negative-dims",
        "negative-dim",
        "float-dim",
        "string-shape",
        "bool-dim",
        "reversed-offsets",
        "negative-offsets",
        "string-offset",
        "three-offsets",
        "list-dtype",
        "truncated",
        "entry-not-object",
        "metadata-value",
        "metadata-string",
        "overlap",
    ],
)
def test_malformed_header_is_a_clear_error(tmp_path: Path, header: bytes, pattern: str) -> None:
    """A corrupt or crafted header fails at open, naming the file, the tensor and the field -
    not later as a negative-size view, an out-of-range read or two tensors sharing bytes."""
    path = _with_header(tmp_path / "bad.safetensors", header)
    with pytest.raises(SafetensorsError, match=pattern) as info:
        SafetensorsReader(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    if b'"x"' in header:
        assert "tensor 'x'" in message


def test_empty_tensors_may_share_an_offset(tmp_path: Path) -> None:
    header = (
        b'{"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
        b'"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    )
    with SafetensorsReader(_with_header(tmp_path / "ok.safetensors", header)) as reader:
        assert reader.get("e").shape == (0,) and reader.get("x").shape == (4,)

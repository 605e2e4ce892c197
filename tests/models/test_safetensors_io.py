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

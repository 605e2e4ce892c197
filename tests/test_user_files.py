"""Nothing a user owns is lost (issue 14, points 1, 2 and 7).

Every directory we write a model or an adapter into - ``qlora quantize``, ``qlora merge``,
`save_adapter`, the GGUF conversion cache - follows one rule: an existing destination that
holds files we did not write is refused unless ``overwrite``, and even then only the files
we write are replaced; the directory a model was loaded from is never written. New files
and directories get the user's umask.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qlora.adapters import export_merged, load_adapter, save_adapter
from qlora.config import LoraConfig, QuantConfig
from qlora.models import load_model, save_quantized
from qlora.nn import add_lora, quantize_model
from tests.adapters.helpers import adapted_llama, logits, max_diff, randomize
from tests.tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")

NOTES = "my own notes\n"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()  # tiny models: extra threads only spin on a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 128)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")


def _source(tmp_path: Path) -> Path:
    """A tiny Hugging Face model directory with a tokenizer, as a user would have one."""
    directory = tmp_path / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_llama(seed=0).save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return directory


def _quantized() -> torch.nn.Module:
    return quantize_model(tiny_llama(seed=0), QuantConfig(kind="nf4"))


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text(NOTES)
    return path


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _no_staging_left(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.name.endswith(".tmp")] == []


# -- point 1: qlora quantize ---------------------------------------------------------------------


def test_quantize_refuses_a_folder_with_user_files(tmp_path: Path) -> None:
    out = _user_folder(tmp_path / "out")
    with pytest.raises(FileExistsError, match=r"out is not empty .*notes\.txt.*--overwrite") as e:
        save_quantized(_quantized(), out)
    assert "\n" not in str(e.value)
    assert _snapshot(out) == {"notes.txt": NOTES.encode()}
    _no_staging_left(tmp_path)


def test_quantize_into_the_current_directory_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_user_folder(tmp_path / "work"))
    with pytest.raises(FileExistsError, match="not empty"):
        save_quantized(_quantized(), ".")
    assert _snapshot(tmp_path / "work") == {"notes.txt": NOTES.encode()}


def test_quantize_cli_into_the_current_directory_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qlora.cli import main

    source = _source(tmp_path)
    monkeypatch.chdir(_user_folder(tmp_path / "work"))
    assert main(["quantize", str(source), "."]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the loader's progress bars
    assert error.startswith("qlora quantize: error: . is not empty") and "--overwrite" in error
    assert _snapshot(tmp_path / "work") == {"notes.txt": NOTES.encode()}


def test_quantize_cli_overwrite_into_the_current_directory_keeps_user_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlora.cli import main

    source = _source(tmp_path)
    work = _user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    assert main(["quantize", str(source), ".", "--overwrite"]) == 0
    assert (work / "notes.txt").read_text() == NOTES
    model, _ = load_model(work, tokenizer=False, progress=False)
    assert model.qlora_load_info.prequantized
    _no_staging_left(work)
    _no_staging_left(tmp_path)


def test_merge_cli_into_its_source_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qlora.cli import main

    source = _source(tmp_path)
    before = _snapshot(source)
    adapter = save_adapter(adapted_llama(), tmp_path / "adapter")
    argv = ["merge", str(source), "--model", str(source), "--adapter", str(adapter)]
    for extra in ([], ["--overwrite"]):
        assert main([*argv, *extra]) == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.startswith(f"qlora merge: error: {source} is the directory the base model")
    assert _snapshot(source) == before


def test_quantize_overwrite_replaces_only_our_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    save_quantized(_quantized(), out)
    _user_folder(out)
    model = quantize_model(tiny_llama(seed=1), QuantConfig(kind="nf4", compute_dtype="float32"))
    save_quantized(model, out, _tokenizer(), overwrite=True)
    assert (out / "notes.txt").read_text() == NOTES
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(_snapshot(out))
    again, _ = load_model(out, tokenizer=False, progress=False)
    assert max_diff(logits(again), logits(model)) == 0
    _no_staging_left(tmp_path)


def test_quantize_overwrite_refuses_to_leave_stale_weights(tmp_path: Path) -> None:
    """Shards of an older model would sit beside (and confuse loaders of) the new one; they
    may be the user's, so they are named, not deleted."""
    out = _user_folder(tmp_path / "out")
    (out / "model.safetensors.index.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    before = _snapshot(out)
    with pytest.raises(
        FileExistsError, match=r"model-00001-of-00002\.safetensors, model\.safetensors\.index"
    ):
        save_quantized(_quantized(), out, overwrite=True)
    assert _snapshot(out) == before
    _no_staging_left(tmp_path)


def test_quantize_overwrite_refuses_stale_tokenizer_files(tmp_path: Path) -> None:
    """Which tokenizer files a save writes is known only once written: checked before any
    of them moves."""
    out = _user_folder(tmp_path / "out")
    (out / "tokenizer.model").write_bytes(b"an older sentencepiece tokenizer")
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=r"out holds tokenizer\.model.*nothing is deleted"):
        save_quantized(_quantized(), out, _tokenizer(), overwrite=True)
    assert _snapshot(out) == before
    _no_staging_left(out)
    _no_staging_left(tmp_path)


def test_quantize_overwrite_cannot_replace_a_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "model.safetensors").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"directory named model\.safetensors"):
        save_quantized(_quantized(), out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]


def test_quantize_never_writes_into_its_source(tmp_path: Path) -> None:
    source = _source(tmp_path)
    before = _snapshot(source)
    model, _ = load_model(source, quant="nf4", tokenizer=False, progress=False)
    (tmp_path / "link").symlink_to(source)
    for target in (source, tmp_path / "link"):
        with pytest.raises(FileExistsError, match=r"loaded from.*choose a new directory"):
            save_quantized(model, target, overwrite=True)
    assert _snapshot(source) == before


def test_quantize_into_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "out").write_text(NOTES)
    with pytest.raises(FileExistsError, match="not a directory"):
        save_quantized(_quantized(), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out").read_text() == NOTES


# -- point 2: qlora merge ------------------------------------------------------------------------


def _adapted_from(source: Path) -> torch.nn.Module:
    model, _ = load_model(source, quant="nf4", tokenizer=False, progress=False)
    return randomize(add_lora(model, LoraConfig(r=2, alpha=4.0, dropout=0.0)))


def test_merge_never_writes_into_its_source(tmp_path: Path) -> None:
    source = _source(tmp_path)
    before = _snapshot(source)
    model = _adapted_from(source)
    (tmp_path / "link").symlink_to(source)
    refused = r"base is the directory the base model was loaded from.*choose a new directory"
    with pytest.raises(FileExistsError, match=refused):
        export_merged(model, source, verbose=False)  # was: the base's weights replaced
    for target in (source, tmp_path / "link"):
        with pytest.raises(FileExistsError, match=r"loaded from.*--overwrite or not"):
            export_merged(model, target, overwrite=True, verbose=False)
    assert _snapshot(source) == before


def test_merge_source_is_found_from_transformers_name_or_path(tmp_path: Path) -> None:
    source = _source(tmp_path)
    before = _snapshot(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(source)
    model = add_lora(base, LoraConfig(r=2, alpha=4.0, dropout=0.0))
    with pytest.raises(FileExistsError, match="loaded from"):
        export_merged(model, source, overwrite=True, verbose=False)
    assert _snapshot(source) == before


def test_merge_refuses_a_folder_with_a_model_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    export_merged(adapted_llama(adapter_seed=1), out, verbose=False)
    _user_folder(out)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=r"merged is not empty.*config\.json.*--overwrite"):
        export_merged(adapted_llama(adapter_seed=2), out, verbose=False)
    assert _snapshot(out) == before
    export_merged(adapted_llama(adapter_seed=2), out, overwrite=True, verbose=False)
    assert (out / "notes.txt").read_text() == NOTES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(logits(merged), logits(adapted_llama(adapter_seed=2))) <= 1e-4


# -- save_adapter: a previous adapter is ours to replace, anything else is not -------------------


def test_save_adapter_replaces_a_previous_adapter(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    save_adapter(adapted_llama(adapter_seed=1), target)
    save_adapter(adapted_llama(adapter_seed=2), target)
    model = tiny_llama(seed=0)
    load_adapter(model, target)
    assert max_diff(logits(model), logits(adapted_llama(adapter_seed=2))) <= 1e-5


def test_save_adapter_after_a_killed_save_still_works(tmp_path: Path) -> None:
    """A save killed mid-way leaves its hidden staging folder inside the adapter folder; the
    next run's save must not take it for a user's file (nor delete it)."""
    target = tmp_path / "adapter"
    save_adapter(adapted_llama(adapter_seed=1), target)
    (target / ".adapter.k1ll3d.tmp").mkdir()
    save_adapter(adapted_llama(adapter_seed=2), target)
    assert (target / ".adapter.k1ll3d.tmp").is_dir()
    (target / ".adapter.notes.tmp").write_text(NOTES)  # a file by that name is not ours
    with pytest.raises(FileExistsError, match=r"not empty \(it holds \.adapter\.notes\.tmp\)"):
        save_adapter(adapted_llama(adapter_seed=2), target)


def test_save_adapter_refuses_unrelated_files_unless_overwrite(tmp_path: Path) -> None:
    target = _user_folder(tmp_path / "adapter")
    with pytest.raises(FileExistsError, match=r"adapter is not empty.*notes\.txt.*--overwrite"):
        save_adapter(adapted_llama(), target)
    assert _snapshot(target) == {"notes.txt": NOTES.encode()}
    save_adapter(adapted_llama(), target, overwrite=True)
    assert (target / "notes.txt").read_text() == NOTES
    assert (target / "adapter_model.safetensors").is_file()


def test_save_adapter_never_writes_beside_a_full_model(tmp_path: Path) -> None:
    source = _source(tmp_path)
    before = _snapshot(source)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"config\.json"):
            save_adapter(adapted_llama(), source, overwrite=overwrite)
    assert _snapshot(source) == before


# -- point 7: the user's umask -------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _assert_modes(directory: Path, umask: int) -> None:
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask, directory
    for path in directory.rglob("*"):
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, path


def test_new_folders_follow_the_umask(tmp_path: Path, umask: int) -> None:
    _assert_modes(save_quantized(_quantized(), tmp_path / "q", _tokenizer()), umask)
    export_merged(adapted_llama(), tmp_path / "merged", _tokenizer(), verbose=False)
    _assert_modes(tmp_path / "merged", umask)
    _assert_modes(save_adapter(adapted_llama(), tmp_path / "adapter"), umask)


def test_files_replaced_in_place_follow_the_umask(tmp_path: Path, umask: int) -> None:
    from qlora.data.tasks import write_jsonl
    from qlora.models.safetensors_io import write_safetensors

    write_safetensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    write_jsonl([{"a": 1}], tmp_path / "d.jsonl")
    for name in ("t.safetensors", "d.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_gguf_cache_entry_follows_the_umask(
    tmp_path: Path, umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversion itself is transformers' (tested with the real model elsewhere); here
    its output is a tiny model, so only our writing of the cache entry runs."""
    pytest.importorskip("gguf")
    from qlora.models.registry import gguf_to_hf

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama(seed=0)
    )
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _tokenizer())
    target = gguf_to_hf(gguf, cache=tmp_path / "cache")
    assert (target / "qlora_source.json").is_file()
    _assert_modes(target, umask)
    _no_staging_left(target.parent)
    # an entry without its marker (a crash while it was published) is converted again
    (target / "qlora_source.json").unlink()
    assert gguf_to_hf(gguf, cache=tmp_path / "cache") == target
    assert (target / "qlora_source.json").is_file()
    _no_staging_left(target)

"""The converter keeps what transformers' GGUF loader drops (the add-BOS flag Gemma needs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from inferd.cache.convert import _special_token_flags  # noqa: E402


def _write(path: Path, add_bos: bool | None) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("add_bos", [True, False])
def test_flags_are_read_from_the_gguf(tmp_path: Path, add_bos: bool) -> None:
    _write(tmp_path / "m.gguf", add_bos)
    assert _special_token_flags(tmp_path / "m.gguf") == {
        "add_bos_token": add_bos,
        "add_eos_token": False,
    }


def test_absent_flags_are_left_alone(tmp_path: Path) -> None:
    _write(tmp_path / "m.gguf", None)
    assert _special_token_flags(tmp_path / "m.gguf") == {"add_eos_token": False}

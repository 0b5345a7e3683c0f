"""The per-CPU dtype probe: measured once, cached under the CPU's identity, and what
trainer.precision=auto and quantization.compute_dtype=auto then choose."""

from __future__ import annotations

import json

import torch

from lmstack.models import cpu_dtype


def test_probe_is_measured_once_and_drives_the_auto_choices(tmp_path):
    torch.set_num_threads(1)
    try:
        first = cpu_dtype.cpu_dtypes(tmp_path)
    finally:
        torch.set_num_threads(2)
    (cached,) = (tmp_path / "cpu_dtype").glob("*.json")
    assert cached.stem == cpu_dtype.cpu_identity()
    assert json.loads(cached.read_text()) == first
    for kind in ("matmul_seconds", "4bit_seconds"):
        assert set(first[kind]) == {"float32", "bfloat16"} and min(first[kind].values()) > 0
    # the choice follows the figures: bfloat16 only when it is clearly faster
    m = first["matmul_seconds"]
    expected = "bfloat16" if m["bfloat16"] * cpu_dtype.MARGIN < m["float32"] else "float32"
    assert first["training"] == expected
    # a second call reads the file (a changed file shows it is not measured again)
    cached.write_text(json.dumps({**first, "training": "float32", "compute_4bit": "bfloat16"}))
    assert cpu_dtype.training_precision("auto", "cpu", tmp_path) == "32-true"
    assert cpu_dtype.compute_dtype_4bit(tmp_path) == torch.bfloat16
    cached.write_text(json.dumps({**first, "training": "bfloat16", "compute_4bit": "float32"}))
    assert cpu_dtype.training_precision("auto", "cpu", tmp_path) == "bf16-mixed"
    assert cpu_dtype.compute_dtype_4bit(tmp_path) == torch.float32
    assert cpu_dtype.training_precision("32-true", "cpu", tmp_path) == "32-true"
    assert "this CPU: bfloat16 matmul" in cpu_dtype.probe_note(tmp_path)

"""End-to-end training runs of the real run.py on the built-in tiny model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli, run_dirs


def only_run_dir(output_dir: Path) -> Path:
    dirs = run_dirs(output_dir)
    assert len(dirs) == 1, dirs
    return dirs[0]


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_sft_lora_writes_records_adapter_and_merged_model(tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_cli(*FAST, "logger=csv", "export.merge=true", output_dir=tmp_path)
    assert "held-out verifier score before training" in result.stdout
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("sft-lora-")
    metrics = metrics_of(run_dir)
    assert 0 < metrics["params/trainable"] < metrics["params/total"]
    assert {"verify/score_before", "verify/score_after", "val/loss", "train/loss"} <= set(metrics)
    for name in ("config.yaml", "recipe.lock.yaml", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (run_dir / name).exists(), name

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    assert (run_dir / "merged" / "tokenizer_config.json").exists()

    again = run_cli(*FAST, "logger=csv", "export.merge=true", output_dir=tmp_path)
    assert "already holds this finished run" in again.stdout
    assert "trainable of" not in again.stdout


def wandb_records(path: Path):
    """Records of a W&B run file: a 7-byte W&B header, then LevelDB-log framing
    (32 KiB blocks; records split into FULL/FIRST/MIDDLE/LAST chunks)."""
    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            return
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending


def wandb_group(run_dir: Path) -> str:
    """The group recorded in a W&B offline run file."""
    from wandb.proto import wandb_internal_pb2

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    for payload in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "run":
            return record.run.run_group
    raise AssertionError(f"no run record in {run_file}")


def test_adapter_sweep_writes_its_points_in_one_wandb_group(tmp_path):
    # qlora as a sweep point is covered by the serving grid and test_qlora_base_is_4bit...
    result = run_cli("-m", "objective=sft", "adapter=lora,dora", *FAST, output_dir=tmp_path)
    dirs = run_dirs(tmp_path)
    assert sorted(d.name.rsplit("-", 1)[0] for d in dirs) == ["sft-dora", "sft-lora"]
    for run_dir in dirs:
        assert metrics_of(run_dir)["verify/score_after"] >= 0, result.stdout
        assert (run_dir / "adapter" / "adapter_config.json").exists()
        assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    groups = {wandb_group(d) for d in dirs}
    assert len(groups) == 1 and groups.pop().startswith("sweep-")
    adapter_config = json.loads((dirs[0] / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is True  # dirs are sorted: sft-dora first


def test_qlora_base_is_4bit_and_trains_fewer_bytes(tmp_path):
    run_cli(*FAST, "adapter=qlora", "logger=none", output_dir=tmp_path)
    metrics = metrics_of(only_run_dir(tmp_path))
    assert metrics["params/trainable"] > 0
    assert only_run_dir(tmp_path).name.startswith("sft-qlora-nf4-")


@pytest.mark.e2e
def test_int8_base_with_lora_trains(tmp_path):
    run_cli(*FAST, "quantization=int8", "logger=none", output_dir=tmp_path)
    assert metrics_of(only_run_dir(tmp_path))["train/loss"] > 0


def test_full_finetune_saves_a_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    run_cli(*FAST, "adapter=none", "objective.lr=1e-4", "logger=none", output_dir=tmp_path)
    run_dir = only_run_dir(tmp_path)
    metrics = metrics_of(run_dir)
    assert metrics["params/trainable"] == metrics["params/total"]
    AutoModelForCausalLM.from_pretrained(run_dir / "model")


def test_hf_model_from_a_local_folder(tmp_path, tiny_base):
    result = run_cli(
        *FAST, "model=hf", f"model.name_or_path={tiny_base}", "logger=none", output_dir=tmp_path
    )
    assert "trainable of" in result.stdout
    bad = run_cli(
        "model=hf",
        f"model.name_or_path={tmp_path}/missing-model",
        "logger=none",
        output_dir=tmp_path,
        check=False,
    )
    assert bad.returncode == 2 and "not a Hugging Face model folder" in bad.stderr


def test_pretrain_objective_on_the_random_model(tmp_path):
    run_cli(*FAST, "objective=pretrain", "model=tiny_random", "logger=none", output_dir=tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("pretrain-lora-")
    assert metrics_of(run_dir)["val/loss"] > 0


@pytest.mark.slow
def test_demo_raises_the_held_out_score(tmp_path):
    """The default demo (SFT + LoRA on tiny_base) with its fixed seeds."""
    run_cli("logger=none", output_dir=tmp_path, timeout=900)
    metrics = metrics_of(only_run_dir(tmp_path))
    assert metrics["verify/score_after"] >= metrics["verify/score_before"] + 0.4, metrics

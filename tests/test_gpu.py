"""GPU checks: run on a machine with CUDA with `scripts/gpu_check.sh` (skipped elsewhere).

bf16-mixed training, QLoRA with a bfloat16 compute dtype, FSDP on the GPUs there are (FSDP is
tested here and not on the CPU: Lightning 2.6 runs FSDPStrategy only with a CUDA accelerator),
DDP over the GPUs, and the peak GPU memory (torch.cuda.max_memory_allocated) against the memory
plan. Not yet run: the session that wrote them had no GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import FAST, REPO, run_cli, run_dirs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPUS = torch.cuda.device_count()
GPU = ["trainer.accelerator=gpu", "logger=csv"]
MODEL_113M = [
    "model.pretrained=false",
    "model.builtin.hidden_size=768",
    "model.builtin.intermediate_size=2048",
    "model.builtin.num_layers=16",
    "model.builtin.num_heads=12",
    "model.builtin.num_kv_heads=12",
]


def metrics(output_dir):
    (run_dir,) = run_dirs(output_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def test_bf16_mixed_sft_trains(tmp_path, tiny_base):
    run_cli(
        *GPU, *FAST, "trainer.precision=bf16-mixed", "trainer.max_steps=30", output_dir=tmp_path
    )
    result = metrics(tmp_path)
    assert result["val/loss"] < result["val/loss_before"]


def test_qlora_with_bfloat16_compute_trains(tmp_path, tiny_base):
    run_cli(
        *GPU,
        *FAST,
        "adapter=qlora",
        "quantization=nf4",
        "quantization.compute_dtype=bfloat16",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=30",
        output_dir=tmp_path,
    )
    result = metrics(tmp_path)
    assert result["val/loss"] < result["val/loss_before"]


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_fsdp_on_every_gpu_trains(adapter, tmp_path, tiny_base):
    run_cli(
        *GPU,
        *FAST,
        f"adapter={adapter}",
        "trainer.strategy=fsdp",
        f"trainer.devices={GPUS}",
        f"data.batch_size={8 * GPUS}",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=20",
        output_dir=tmp_path,
    )
    result = metrics(tmp_path)
    assert result["val/loss"] < result["val/loss_before"]
    (run_dir,) = run_dirs(tmp_path)
    assert (run_dir / ("adapter" if adapter == "lora" else "model")).exists()


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_ddp_on_two_gpus_matches_one(tmp_path, tiny_base):
    args = [*GPU, *FAST, "trainer.log_every_n_steps=1", "verify.enabled=false"]
    run_cli(*args, "trainer.devices=2", "trainer.strategy=ddp", output_dir=tmp_path / "two")
    run_cli(*args, output_dir=tmp_path / "one")
    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-3)


@pytest.mark.parametrize(
    "config",
    ["adapter=lora", "adapter=qlora quantization=nf4", "adapter=none", "objective=dpo"],
)
def test_peak_gpu_memory_is_within_25_percent_of_the_plan(config):
    overrides = f"{config} {' '.join(MODEL_113M)} trainer.accelerator=gpu data.batch_size=8"
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "memory_probe.py"), overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    error = line["estimate"] / line["measured"] - 1
    print(
        f"{config}: plan {line['estimate']:,} B, peak {line['measured']:,} B ({100 * error:+.1f}%)"
    )
    assert abs(error) <= 0.25, line

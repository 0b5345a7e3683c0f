"""Every adapter weight learns under lora, dora, qlora and int8, with and without an
evaluation pass first, on every CPU kernel path bitsandbytes picks.

bitsandbytes repacks a 4-bit weight for its AVX-512-bf16 inference kernel the first
time a Linear4bit runs in eval mode without gradients; that kernel has no backward,
so before the fix in models/loading.py an evaluation pass silently froze every
adapter below the last 4-bit layer. The kernel bitsandbytes picks depends on the
CPU: whether it reports AVX-512 bf16 (patched here both ways) and the ATen CPU
capability (AVX-512 or AVX2; the second runs in a subprocess with
ATEN_CPU_CAPABILITY=avx2, as a CPU without AVX-512 would).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_config import compose_config

from conftest import CACHE_DIR, REPO

CASES = {
    "lora": ["adapter=lora"],
    "dora": ["adapter=dora"],
    "qlora": ["adapter=qlora"],
    "qlora-dora": ["adapter=qlora", "adapter.use_dora=true"],
    "int8": ["adapter=lora", "quantization=int8"],
}


def load_tiny(overrides: list[str]):
    from lmstack.launch import validate
    from lmstack.models.loading import load_for_training

    config = validate(compose_config("model=tiny_random", *overrides))
    return load_for_training(config, str(CACHE_DIR))


def evaluation_pass(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """What Lightning's validation loop (and the verifier, and rollouts) do."""
    model.eval()
    with torch.no_grad():
        model(input_ids=batch)
    model.train()


def adapter_gradients(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def check(case: str) -> None:
    """One step (LoRA's B starts at zero, so A's gradient is zero until B has moved),
    then the gradients on one batch before and after an evaluation pass must agree,
    and a second step must move every trained weight."""
    torch.manual_seed(0)
    loaded = load_tiny(CASES[case])
    model, batch = loaded.model, torch.randint(3, len(loaded.tokenizer), (2, 16))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    adapter_gradients(model, batch)
    optimizer.step()
    before = adapter_gradients(model, batch)
    evaluation_pass(model, batch)
    after = adapter_gradients(model, batch)
    wrong = [n for n in before if not torch.allclose(before[n], after[n], rtol=1e-3, atol=1e-6)]
    assert not wrong, f"{case}: an evaluation pass changed {len(wrong)} gradients: {wrong[:3]}"
    optimizer.step()
    frozen = [n for n, p in model.named_parameters() if n in start and torch.equal(p, start[n])]
    assert not frozen, f"{case}: {len(frozen)} of {len(start)} weights never changed: {frozen[:3]}"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only adds synchronisation (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[True, False], ids=["bf16repack", "norepack"])
def bf16_repack(request, monkeypatch):
    """bitsandbytes reads has_avx512bf16() when a Linear4bit is built."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    return request.param


@pytest.mark.parametrize("case", ["qlora", "qlora-dora"])
def test_4bit_adapters_learn_on_both_kernels(case, bf16_repack, tiny_random):
    check(case)


@pytest.mark.parametrize("case", ["lora", "dora", "int8"])
def test_adapters_learn(case, tiny_random):
    check(case)


def test_a_repacked_4bit_layer_is_restored_to_the_differentiable_path():
    """A model that was repacked (served or evaluated) before training is restored."""
    import bitsandbytes as bnb

    from lmstack.models.loading import keep_4bit_layers_differentiable

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False).to("cpu")
    layer.support_avx512bf16_for_cpu = True  # force the repack whatever this CPU has
    x = torch.randn(4, 128)
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu
    keep_4bit_layers_differentiable(layer.train())
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.skipif(
    os.environ.get("ATEN_CPU_CAPABILITY") is not None
    or torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="already on the AVX2 kernels",
)
def test_adapters_learn_on_the_avx2_kernels():
    """bitsandbytes registers its AVX-512 int8 and 4-bit kernels only on an AVX-512 CPU:
    the same checks with ATen capped at AVX2 take the other kernels."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "(bf16repack and not dora) or int8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

"""Every adapter weight learns under lora, dora, qlora and int8, with and without an
evaluation pass first, on every CPU kernel path bitsandbytes picks.

bitsandbytes repacks a 4-bit weight for its AVX-512-bf16 inference kernel the first
time a Linear4bit runs in eval mode without gradients; that kernel has no backward,
so before the fix in models/loading.py an evaluation pass silently froze every
adapter below the last 4-bit layer. Which kernels a 4-bit layer runs on a CPU depends on:

- whether bitsandbytes sees AVX-512 bf16 (the repacked inference kernel; patched here both ways);
- the compute dtype (quantization.compute_dtype: float32 and bfloat16 dequantize through
  different kernels, and the matmul runs in that dtype);
- double quantization (a no-grad forward takes a different gemm path for nested constants);
- the ATen CPU capability: bitsandbytes registers its AVX-512 int8 and 4-bit kernels only on
  an AVX-512 CPU, so the same checks run again in a subprocess with ATEN_CPU_CAPABILITY=avx2,
  as a CPU without AVX-512 would.
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
    "qlora-float32": ["adapter=qlora", "quantization.compute_dtype=float32"],
    "qlora-bfloat16": ["adapter=qlora", "quantization.compute_dtype=bfloat16"],
    "qlora-single-quant": ["adapter=qlora", "quantization.double_quant=false"],
    "qlora-dora": ["adapter=qlora", "adapter.use_dora=true"],
    "int8": ["adapter=lora", "quantization=int8"],
}
# (case, does bitsandbytes see AVX-512 bf16): the repacked kernel with every 4-bit setting;
# without it the two compute dtypes (the other settings do not change that path)
FOUR_BIT = [(case, True) for case in CASES if case.startswith("qlora")] + [
    ("qlora-float32", False),
    ("qlora-bfloat16", False),
]


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


def check(case: str, eval_first: bool) -> None:
    """One step (LoRA's B starts at zero, so A's gradient is zero until B has moved), then
    every trained weight must have a non-zero gradient, the same before and after an
    evaluation pass, and a second step (no weight decay) must move every trained weight.
    ``eval_first``: an evaluation pass before any training (Lightning's sanity check and
    the before-training validation do that)."""
    torch.manual_seed(0)
    loaded = load_tiny(CASES[case])
    model, batch = loaded.model, torch.randint(3, len(loaded.tokenizer), (2, 16))
    if eval_first:
        evaluation_pass(model, batch)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.0)
    adapter_gradients(model, batch)
    optimizer.step()
    before = adapter_gradients(model, batch)
    no_gradient = [n for n, g in before.items() if not g.abs().sum() > 0]
    assert not no_gradient, f"{case}: {len(no_gradient)} weights get no gradient: {no_gradient[:3]}"
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


def see_avx512_bf16(monkeypatch, seen: bool) -> None:
    """bitsandbytes reads has_avx512bf16() when a Linear4bit is built."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: seen)


@pytest.fixture(params=[False, True], ids=["train_first", "eval_first"])
def eval_first(request):
    return request.param


@pytest.mark.parametrize(
    "case,bf16_repack",
    FOUR_BIT,
    ids=[f"{case}-{'bf16repack' if repack else 'norepack'}" for case, repack in FOUR_BIT],
)
def test_4bit_adapters_learn_on_every_kernel(
    case, bf16_repack, eval_first, monkeypatch, tiny_random
):
    see_avx512_bf16(monkeypatch, bf16_repack)
    check(case, eval_first)


@pytest.mark.parametrize("case", ["lora", "dora", "int8"])
def test_adapters_learn(case, eval_first, tiny_random):
    check(case, eval_first)


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


@pytest.mark.e2e
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
            "(bf16repack and not dora and not single) or int8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

"""The `quantization` group's schema (conf/quantization/): how the base is quantized to train."""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.config.rules import Choice, require_choice


class Quantization(Choice):
    none = "none"
    int8 = "int8"
    nf4 = "nf4"


QUANTIZATIONS = tuple(Quantization)


@dataclass
class QuantizationConfig:
    name: Quantization = Quantization.none
    # auto: float32 on CPU (bfloat16 4-bit matmuls are ~30x slower without AVX-512),
    # bfloat16 on CUDA.
    compute_dtype: str = "auto"
    double_quant: bool = True

    def __post_init__(self) -> None:
        require_choice(
            self.compute_dtype,
            ("auto", "float32", "bfloat16", "float16"),
            "quantization.compute_dtype",
        )

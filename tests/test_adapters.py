"""PEFT adapter folders made outside lmstack (here with peft itself) are taken wherever a
model is: training from them, evaluating and serving them; a bad one is a clear exit 2.
lmstack's own adapters name their base portably and load with PeftModel on another machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_gateway import make_config

from lmstack.errors import ConfigError

from conftest import FAST, run_cli, run_dirs


def make_adapter(base_model, folder: Path, base_name: str) -> Path:
    """An adapter as TRL or peft users have them: adapter_config.json and weights, no tokenizer."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base_model, config)
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    return folder


@pytest.fixture(scope="module")
def outside_adapter(tiny_base, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    return make_adapter(base, tmp_path_factory.mktemp("trl") / "adapter", str(tiny_base))


def test_an_outside_adapter_is_taken_as_init_from_model_and_served(
    outside_adapter, tiny_base, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmstack.models.loading import resolve_base_path
    from lmstack.serving.engines import servable_model

    cache = str(tmp_path / "cache")
    init = make_config(f"model.init_from={outside_adapter}")
    merged = Path(resolve_base_path(init.model, cache))
    plain = make_config("model=hf", f"model.name_or_path={outside_adapter}")
    assert Path(resolve_base_path(plain.model, cache)) == merged  # merged once, cached
    served = make_config(f"serving.model={outside_adapter}")
    assert servable_model(served, cache)[0] == str(merged)
    # the merged model is the adapter on its base, with the base's tokenizer and template
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, outside_adapter).eval()
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.no_grad():
        want = with_adapter(ids).logits
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    assert (merged / "tokenizer_config.json").is_file()


def test_a_bad_outside_adapter_names_the_file_and_what_to_pass(
    outside_adapter, tiny_base, tmp_path
):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmstack.models.loading import resolve_base_path

    cache = str(tmp_path / "cache")
    moved = tmp_path / "moved"
    shutil.copytree(outside_adapter, moved)
    config_file = moved / "adapter_config.json"
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": "/gone/x"})
    )
    with pytest.raises(ConfigError) as missing:
        resolve_base_path(make_config(f"model.init_from={moved}").model, cache)
    assert str(config_file) in str(missing.value) and "model.base=" in str(missing.value)
    # given the base explicitly, the same folder works
    given = make_config(f"model.init_from={moved}", f"model.base={tiny_base}")
    assert (Path(resolve_base_path(given.model, cache)) / "config.json").is_file()
    # an adapter for another architecture on this base
    torch.manual_seed(0)
    small = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2)
    )  # fmt: skip
    other = make_adapter(small, tmp_path / "other", str(tiny_base))
    with pytest.raises(ConfigError) as mismatched:
        resolve_base_path(make_config(f"model.init_from={other}").model, cache)
    assert f"the adapter in {other} does not fit the base" in str(mismatched.value)
    assert "model.base=" in str(mismatched.value)


def test_a_bad_adapter_exits_2_on_the_command_line(outside_adapter, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(outside_adapter, moved)
    config_file = moved / "adapter_config.json"
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": "/gone/x"})
    )
    result = run_cli(
        "phase=eval", "eval=verifier", f"model.init_from={moved}", "logger=none",
        output_dir=tmp_path / "out", check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.base=" in result.stderr and str(config_file) in result.stderr
    assert "Traceback" not in result.stderr


def test_lmstacks_adapter_names_its_base_portably(tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmstack.models.loading import resolve_base_path

    run_cli(*FAST, "trainer.max_steps=2", "verify.enabled=false", "logger=none",
            output_dir=tmp_path)  # fmt: skip
    (run_dir,) = run_dirs(tmp_path)
    # on "another machine": the adapter folder alone, somewhere else
    elsewhere = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(run_dir / "adapter", elsewhere)
    shutil.rmtree(run_dir)
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_base.name  # not an absolute cache path
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    PeftModel.from_pretrained(base, elsewhere)  # loads, given the base
    # lmstack finds the base by that name in its cache
    merged = resolve_base_path(make_config(f"model.init_from={elsewhere}").model, tiny_base.parent)
    assert (Path(merged) / "config.json").is_file()


@pytest.mark.slow
def test_an_outside_adapter_trains_evaluates_and_benchmarks(outside_adapter, tmp_path):
    run_cli(*FAST, "trainer.max_steps=2", f"model.init_from={outside_adapter}", "logger=none",
            output_dir=tmp_path / "train")  # fmt: skip
    run_cli("phase=eval", "eval=verifier", "eval.num_prompts=4", "logger=none",
            f"model.init_from={outside_adapter}", output_dir=tmp_path / "eval")  # fmt: skip
    run_cli("phase=bench", "bench.num_requests=2", "bench.max_tokens=4", "logger=none",
            f"serving.model={outside_adapter}", output_dir=tmp_path / "bench")  # fmt: skip
    for name in ("train", "eval", "bench"):
        (run_dir,) = run_dirs(tmp_path / name)
        assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"

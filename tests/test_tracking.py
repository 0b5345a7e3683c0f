"""Run records: secrets never reach disk, hub datasets load from local folders."""

from __future__ import annotations

import json

from lmstack.data.sources import load_rows
from lmstack.tracking.run_dir import redact

from conftest import data_config


def test_secrets_are_redacted_from_records():
    config = {
        "serving": {"api_key": "sk-123", "url": "http://x"},
        "logger": {"token": ""},
        "judges": [{"password": "hunter2"}],
    }
    clean = redact(config)
    assert clean["serving"] == {"api_key": "***", "url": "http://x"}
    assert clean["judges"][0]["password"] == "***"
    assert clean["logger"]["token"] == ""  # empty values stay as they are
    assert "sk-123" not in json.dumps(clean)


def test_hub_dataset_code_loads_a_local_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = data_config(source="hub", path=str(folder), eval_fraction=0.1)
    loaded = load_rows(data, "sft")
    assert loaded.format == "prompt_completion"
    assert len(loaded.train) == 18 and len(loaded.eval) == 2

"""Config loading: YAML + overrides, and one clear line (exit 2) for every kind of bad input."""
import subprocess
import sys

import pytest
import yaml

from jobs.cli import main
from pipeline.config import ConfigError, load_config


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_flags_override_yaml_keys(tmp_path):
    path = write_yaml(tmp_path, {"input": ["a.tar"], "output": "out", "vocab": ["cat"], "batch_size": 8,
                                 "gem": {"depth": 5, "iters": 2}})
    config = load_config(path, {"batch_size": 2, "gem.depth": 3, "input_size": [224]})
    assert config.batch_size == 2 and config.gem.depth == 3 and config.gem.iters == 2
    assert config.input_size == [224, 224] and config.input == ["a.tar"]


@pytest.mark.parametrize("data, message", [
    ({"input": "a.tar", "output": "o", "vocab": ["cat"], "batchsize": 3}, "unknown key batchsize"),
    ({"input": "a.tar", "output": "o", "vocab": ["cat"], "batch_size": "big"}, "batch_size: expected an integer"),
    ({"input": "a.tar", "output": "o", "vocab": ["cat"], "gem": {"depht": 2}}, "unknown key gem.depht"),
    ({"input": "a.tar", "output": "o"}, "vocab"),
    ({"output": "o", "vocab": ["cat"]}, "input"),
    ({"input": "a.tar", "output": "o", "vocab": ["cat"], "thresholds": {"background_threshold": 2}}, "[0, 1]"),
    ({"input": "a.tar", "output": "o", "vocab": ["cat"], "batch_size": 0}, "batch_size: must be positive"),
    ({"input": "a.tar", "output": "o", "vocab": ["cat"], "overwrite": "yes"}, "expected true or false"),
    ({"input": "a.tar", "output": "o", "vocab": ["cat"], "precision": "int4"}, "precision"),
])
def test_bad_config_is_one_clear_error(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(write_yaml(tmp_path, data))


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [a\n  b: }")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_cli_exits_2_with_one_line(tmp_path, capsys):
    path = write_yaml(tmp_path, {"input": ["a.tar"], "output": str(tmp_path / "o"), "vocab": ["cat"],
                                 "batch_size": -1})
    assert main(["label", "--config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gemlabel: error: batch_size: must be positive, got -1"]
    # a duplicate class and a missing input glob are configuration errors too, found before Ray starts
    assert main(["label", "--input", str(tmp_path / "*.tar"), "--output", str(tmp_path / "o"),
                 "--vocab", "cat,dog"]) == 2
    assert "matches no file" in capsys.readouterr().err
    (tmp_path / "x.tar").write_bytes(b"")
    assert main(["label", "--input", str(tmp_path / "x.tar"), "--output", str(tmp_path / "o"),
                 "--vocab", "cat,cat"]) == 2
    assert "repeats class names" in capsys.readouterr().err


def test_installed_command_reports_usage_errors():
    result = subprocess.run([sys.executable, "-m", "jobs.label", "--batch-size", "many"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invalid int value" in result.stderr


def test_model_and_weights_are_checked_before_any_worker_starts(tmp_path, capsys):
    import time
    (tmp_path / "a.tar").write_bytes(b"")
    base = ["label", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "o"), "--vocab", "cat"]
    start = time.monotonic()
    assert main([*base, "--model", "ViT-B-16", "--pretrained", "openai"]) == 2  # offline, not cached
    assert main([*base, "--model", "RN50", "--pretrained", "openai"]) == 2
    assert main([*base, "--model", "ViT-B-16", "--pretrained", str(tmp_path / "nope.pt")]) == 2
    assert time.monotonic() - start < 20
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("gemlabel: error: model: ") for line in lines)
    assert "pass its local path" in lines[0] and "VisionTransformer" in lines[1] and "local checkpoint" in lines[2]

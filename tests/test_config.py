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
    # the offline line names the file and hub repo to fetch, the random-weights smoke run, and the flag
    assert "download open_clip_pytorch_model.bin from Hugging Face hub repo timm/vit_base_patch16_clip_224.openai" \
        in lines[0] and "pretrained 'none' to run on random weights" in lines[0]
    assert lines[0].endswith("; on the command line, pretrained is --pretrained")


# ---- one schema: YAML keys, flags, help, docs/configuration.md ----

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_documented_configuration_table_is_the_generated_one():
    from pipeline.config import markdown_table
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = page.split("<!-- config-table:begin -->\n", 1)[1].split("\n<!-- config-table:end -->", 1)[0]
    assert table == markdown_table(), \
        "docs/configuration.md's table is stale: paste `.venv/bin/python -m pipeline.config` into it"


def test_every_key_has_a_flag_with_help_and_default(capsys):
    from pipeline.config import config_keys
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for key in config_keys():
        assert key.flag or key.no_flag, key.key
        if key.flag:
            assert key.description, key.key
            assert key.flag in help_text, key.flag
    # input_size's default is shown as the list it is (short_side's own default is a plain 448)
    assert "come back at the image's own size (default: [448, 448])" in help_text
    assert "(default: 600.0)" in help_text and "(default: required)" in help_text


def test_each_flag_sets_its_key(tmp_path, monkeypatch):
    """Every generated flag lands on its schema key, typed as the schema says."""
    import jobs.cli as cli
    import jobs.flags as flags
    from pipeline.config import config_keys
    samples = {"bool": None, "int": "3", "float": "0.5", "list-int": ["224"], "choice": None}
    # issue 11's size keys have lower bounds above 3 (and max_long_side >= short_side)
    sizes = {"short_side": "224", "max_long_side": "448", "slide.crop": "224"}
    argv = ["label", "--config", write_yaml(tmp_path, {"input": ["a.tar"], "output": "o", "vocab": ["cat"]})]
    for key in config_keys():
        if key.kind == "bool":
            argv.append(key.flag)
        elif key.key == "decode":  # gpu needs GPU workers, and the last device choice is cpu
            argv += [key.flag, "cpu"]
        elif key.key == "refine":  # refine: sam refuses the --pamr this test sets
            argv += [key.flag, "none"]
        elif key.kind == "choice":
            argv += [key.flag, typing_args(key)[-1]]
        elif key.kind == "list-int":
            argv += [key.flag, "224"]
        elif key.kind == "list-float":
            argv += [key.flag, "0.5", "0.5", "0.5"]
        elif key.key.endswith(".arch"):
            argv += [key.flag, '{"depth": 2}']
        elif key.cli == "json":
            argv += [key.flag, '{"s3": {"anon": true}}']
        elif key.key in sizes:
            argv += [key.flag, sizes[key.key]]
        elif key.kind in samples:
            argv += [key.flag, samples[key.kind]]
        elif key.key == "vocab":
            argv += [key.flag, "cat, sweet pepper"]
        elif key.key not in ("vocab_file", "input", "output", "model_config"):
            argv += [key.flag, "x{}" if key.key == "templates" else "x"]
    overrides = flags.overrides(cli._parser().parse_args(argv))
    config = load_config(argv[2], overrides)
    assert config.vocab == ["cat", "sweet pepper"] and config.gem.depth == 3 and config.thresholds.min_area == 3
    assert config.thresholds.background_threshold == 0.5 and config.input_size == [224, 224]
    assert config.overwrite and config.retry_failed and config.progress is False
    assert config.storage_options == {"s3": {"anon": True}} and config.device == "cpu" and config.decode == "cpu"
    assert config.schedule_timeout_s == 0.5 and config.ray_address == "x"
    assert config.proxyclip.vfm.arch == {"depth": 2} and config.proxyclip.vfm.std == (0.5, 0.5, 0.5)
    assert config.sam.iou_thresh == 0.5 and config.sam.model == "vit_h" and config.sam.weights == "x"


def typing_args(key):
    import typing
    return list(typing.get_args(key.annotation))


def test_library_and_config_share_one_definition():
    import gem
    from pipeline.config import GEMConfig, ThresholdConfig
    assert gem.GEMSettings is GEMConfig and gem.LabelingThresholds is ThresholdConfig
    with pytest.raises(ValueError, match="background_threshold"):
        gem.LabelingThresholds(background_threshold=1.5)


def test_config_loading_and_report_do_not_import_torch(tmp_path):
    code = ("import sys; from jobs.cli import main; from pipeline.config import load_config; "
            "import pipeline.store.report, gem, gemlabel; from gem import GEMSettings; "
            f"load_config(None, {{'input': 'a.tar', 'output': 'o', 'vocab': ['cat']}}); "
            f"main(['report', {str(tmp_path)!r}]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'ray')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("gemlabel ")

"""Bad input to report and pack is blamed on what is wrong, in one line (issue 18.17)."""
from jobs.cli import main
from tests.shards import encode, photo


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_report_with_an_input_glob_that_matches_nothing_blames_the_input(labelled_output, tmp_path, capsys):
    assert main(["report", labelled_output, "--input", str(tmp_path / "nothing-*.tar")]) == 2
    line = _one_line(capsys)
    assert line == (f"gemlabel: error: --input: input glob {tmp_path / 'nothing-*.tar'} matches no file "
                    "(globs match only .tar, .tar.gz, .tgz files)"), line


def test_pack_into_a_path_under_a_file_says_so(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(encode(photo(0, (20, 20)), "JPEG"))
    (tmp_path / "afile").write_text("not a folder")
    prefix = tmp_path / "afile" / "sub" / "shard"
    assert main(["pack", str(tmp_path / "imgs"), str(prefix)]) == 2
    line = _one_line(capsys)
    assert line == f"gemlabel: error: output prefix {prefix} is under {tmp_path / 'afile'}, which is a file, not a folder"
    assert (tmp_path / "afile").read_text() == "not a folder"

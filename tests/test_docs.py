"""The README and docs/ run as written: one convention for the venv's programs, every `gemlabel`
command parses with the real command's parser, the files the commands name are shipped, what they
write is git-ignored, links resolve, and the library snippets run (with random-weight models)."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]

VENV_PROGRAMS = {"gemlabel", "python", "pip", "ray", "pytest"}  # what the README's set-up installs in .venv
SHIPPED = {"gem", "gemlabel", "pipeline", "jobs", "tests", "infra", "bench", "docs", ".ci"}  # top-level folders
OUTPUT_FLAGS = {"--output", "--dest", "--report"}  # flags naming where a command writes
SEPARATORS = {"&&", "||", ";", "|", "&"}
PATH_ON_PATH = re.compile(r"""^export\b.*\bPATH=["']?\$PWD/\.venv/bin:""")  # `.venv/bin` first on PATH


@dataclass
class Command:
    page: Path
    text: str        # the line (continuations joined) it comes from
    argv: list[str]  # one command of it (split at &&, ;, |), redirections kept
    inline: bool     # from an inline code span, not a fenced block
    venv_on_path: bool  # an earlier line of its block put .venv/bin first on PATH

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}: {self.text}"


def split_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [argv for argv in [*commands, current] if argv]


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced block, the fence's indentation removed (blocks in lists)."""
    blocks, language, lines, indent = [], None, [], 0
    for line in text.splitlines():
        fence = re.match(r"^(\s*)```(\S*)\s*$", line)
        if language is None and fence:
            language, lines, indent = fence.group(2), [], len(fence.group(1))
        elif language is not None and fence and not fence.group(2):
            blocks.append((language, lines))
            language = None
        elif language is not None:
            lines.append(line[indent:] if line[:indent].strip() == "" else line)
    assert language is None, "an unclosed fenced block"
    return blocks


def prose(text: str) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```\s*$", "", text, flags=re.S | re.M)


def inline_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(text))


def block_commands(page: Path) -> list[Command]:
    commands = []
    for language, lines in fenced_blocks(page.read_text(encoding="utf-8")):
        if language not in ("bash", "sh", "shell", "console"):
            continue
        venv_on_path = False
        joined = "\n".join(lines).replace("\\\n", " ")
        for line in joined.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            for argv in split_commands(line):
                commands.append(Command(page, line.strip(), argv, False, venv_on_path))
            venv_on_path = venv_on_path or bool(PATH_ON_PATH.match(line.strip()))
    return commands


def inline_commands(page: Path) -> list[Command]:
    """Inline code spans that are commands: those that name a venv program by its path, make the
    venv, or run kubectl or docker (a name alone is not a command)."""
    commands = []
    for span in inline_spans(page.read_text(encoding="utf-8")):
        if span.startswith((".venv/bin/", "python3 -m venv ", "kubectl ", "docker ")) and " " in span:
            for argv in split_commands(span):
                commands.append(Command(page, span, argv, True, False))
    return commands


def all_commands() -> list[Command]:
    return [command for page in PAGES for command in (*block_commands(page), *inline_commands(page))]


def program(argv: list[str]) -> str:
    return argv[0]


def gemlabel_parser():
    """The command's own parser, abbreviations of flags refused (the pages spell flags out)."""
    import argparse

    from jobs import cli
    build = getattr(cli, "_parser", None) or getattr(cli, "parser")
    parser, todo = build(), []
    todo.append(parser)
    while todo:
        current = todo.pop()
        current.allow_abbrev = False
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return parser


def gemlabel_args(argv: list[str]) -> list[str] | None:
    """The `gemlabel` arguments of a command line: `.venv/bin/gemlabel ARGS`, or the `python -m
    jobs.label ARGS` of a `ray job submit` (which is `gemlabel label ARGS`); None for other commands."""
    if program(argv) in (".venv/bin/gemlabel", "gemlabel"):
        return argv[1:]
    for index, token in enumerate(argv[:-2]):
        if token in ("python", ".venv/bin/python") and argv[index + 1:index + 3] == ["-m", "jobs.label"]:
            return ["label", *argv[index + 3:]]
    return None


def without_redirections(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in (">", ">>", "<", "2>"):
            skip = True
        else:
            out.append(token)
    return out


# ---- the pages exist and the README is the map ----

def test_readme_is_a_map_under_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move reference text to docs/"
    readme = README.read_text(encoding="utf-8")
    for page in PAGES[1:]:  # every docs page is reachable from the map
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    for name in ("configuration", "output", "quality", "look-and-export", "cluster", "methods", "library", "layout"):
        assert (REPO / "docs" / f"{name}.md").is_file(), name


def test_the_commands_are_found():
    commands = all_commands()
    assert len(commands) > 30
    pages = {command.page for command in commands}
    assert README in pages and REPO / "docs" / "cluster.md" in pages


# ---- one convention: the venv's programs by path ----

def test_venv_programs_are_named_by_path_everywhere():
    """`.venv/bin/gemlabel`, never a bare `gemlabel` (the README never activates the venv), except
    after a line of the same block that puts .venv/bin first on PATH (docs/cluster.md's step 2)."""
    bad = []
    for command in all_commands():
        name = program(command.argv)
        if name == "python3":
            if command.argv[1:3] != ["-m", "venv"]:
                bad.append(command)
        elif name in VENV_PROGRAMS and not command.venv_on_path:
            bad.append(command)
    # inline spans that look like commands (a flag or a path after the program) follow it too, but
    # for `python -m jobs.label`: what a Ray job runs on the cluster, with the cluster's python
    for page in PAGES:
        for span in inline_spans(page.read_text(encoding="utf-8")):
            words = span.split()
            if span.startswith("python -m jobs.label"):
                continue
            if words[0] in VENV_PROGRAMS and any(w.startswith("-") or "/" in w for w in words[1:]):
                bad.append(f"{page.relative_to(REPO)}: `{span}`")
    assert not bad, "bare venv programs (write .venv/bin/NAME):\n" + "\n".join(map(str, bad))


def test_test_command_is_the_one_ci_runs():
    readme = README.read_text(encoding="utf-8")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    blocks = [lines for language, lines in fenced_blocks(readme) if language == "bash"]
    assert [".venv/bin/python -m pytest -q tests"] in blocks  # the README's test command, alone in its block
    assert ci[-1] == ".venv/bin/python -m pytest -q tests"
    install = next(lines[0] for lines in blocks if lines[0].startswith("python3 -m venv .venv && "))
    pip = next(line for line in ci if line.startswith(".venv/bin/pip install ")).replace(" -q ", " ")
    assert f" && {pip} && " in install, "README's install line and .ci/run install different things"


# ---- every gemlabel command parses with the real parser ----

def test_every_gemlabel_command_parses(capsys):
    parser = gemlabel_parser()
    checked, bad = 0, []
    for command in all_commands():
        args = gemlabel_args(without_redirections(command.argv))
        if args is None:
            continue
        checked += 1
        try:
            parser.parse_args(args)
        except SystemExit as exit:  # --help and --version exit 0, a bad flag 2
            if exit.code:
                bad.append(f"{command}\n    {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert checked > 25
    assert not bad, "commands the gemlabel parser refuses:\n" + "\n".join(bad)


def test_every_python_module_run_exists():
    import importlib.util
    checked = 0
    for command in all_commands():
        argv = command.argv
        for index, token in enumerate(argv[:-2]):
            if token in ("python", ".venv/bin/python") and argv[index + 1] == "-m":
                module = argv[index + 2]
                spec = importlib.util.find_spec(module)
                assert spec is not None, f"{command}: no module {module}"
                if spec.submodule_search_locations is not None:  # a package runs its __main__
                    assert importlib.util.find_spec(f"{module}.__main__"), f"{command}: {module} has no __main__"
                checked += 1
    assert checked >= 3


# ---- the files the commands name ----

def candidate_paths(argv: list[str]) -> list[str]:
    paths = []
    for token in argv:
        for part in token.split("="):  # --from-file=job.yaml=jobs/configs/s3-large.yaml
            part = part.removeprefix("$PWD/")
            if "://" not in part and not part.startswith(("/", "-")) and "/" in part:
                paths.append(part)
    return paths


def test_every_shipped_file_a_command_names_exists():
    missing, checked = [], 0
    for command in all_commands():
        for path in candidate_paths(without_redirections(command.argv)):
            top = path.split("/", 1)[0]
            if top not in SHIPPED:
                continue
            checked += 1
            if any(c in path for c in "*?["):
                if not list(REPO.glob(path)):
                    missing.append(f"{command}: {path} matches nothing")
            elif not (REPO / path).exists():
                missing.append(f"{command}: {path}")
    assert checked >= 15
    assert not missing, "\n".join(missing)


def written_paths(command: Command) -> list[str]:
    """Relative local paths the command writes: its output flags, pack's prefix, show's default
    folder, a shell redirection."""
    argv, paths = command.argv, []
    for index, token in enumerate(argv[:-1]):
        if token in OUTPUT_FLAGS:
            paths.append(argv[index + 1] + "/_config.json")  # folders: something in them
        elif token in (">", ">>"):
            paths.append(argv[index + 1])
    args = gemlabel_args(without_redirections(argv))
    if args and args[0] == "pack":
        positional = [a for i, a in enumerate(args[1:], 1) if not a.startswith("-") and not args[i - 1].startswith("-")]
        paths.append(positional[1] + "-000000.tar")
    if args and args[0] == "show" and "--dest" not in args:
        paths.append("gemlabel-show/index.html")
    return [p.removeprefix("$PWD/") for p in paths if "://" not in p and not p.startswith("/")]


def test_what_the_commands_write_is_git_ignored():
    """So it does not land in commits, nor travel with `ray job submit --working-dir .`."""
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    paths = sorted({path for command in all_commands() for path in written_paths(command)})
    assert "gemlabel-show/index.html" in paths and "demo/labels-random/_config.json" in paths
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "--stdin"], input="\n".join(paths),
                             capture_output=True, text=True).stdout.split()
    assert not sorted(set(paths) - set(ignored)), "written but not git-ignored"


# ---- links ----

def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", prose(page.read_text(encoding="utf-8")), re.M)}


def test_links_between_readme_and_docs_resolve():
    checked, bad = 0, []
    for page in [*PAGES, REPO / "BENCHMARKS.md"]:
        text = re.sub(r"`[^`\n]*`", "", prose(page.read_text(encoding="utf-8")))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                bad.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                bad.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert checked > 20
    assert not bad, "\n".join(bad)


# ---- generated text ----

def test_python_m_pipeline_config_prints_the_documented_table():
    result = subprocess.run([sys.executable, "-m", "pipeline.config"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = page.split("<!-- config-table:begin -->\n", 1)[1].split("\n<!-- config-table:end -->", 1)[0]
    assert result.stdout.strip() == table


def test_the_demo_example_names_a_class_of_the_demo_vocabulary():
    import yaml
    vocab = yaml.safe_load((REPO / "jobs" / "configs" / "local.yaml").read_text())["vocab"]
    classes = {entry if isinstance(entry, str) else entry[0] for entry in vocab}
    for command in all_commands():
        args = gemlabel_args(command.argv)
        if args and args[0] == "show" and "demo/labels" in args and "--class" in args:
            assert args[args.index("--class") + 1] in classes, command


# ---- the snippets run ----

def python_snippets(page: Path) -> list[str]:
    return ["\n".join(lines) for language, lines in fenced_blocks(page.read_text(encoding="utf-8"))
            if language == "python"]


def run_snippet(code: str) -> dict:
    namespace: dict = {"__name__": "__snippet__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "<snippet>", "exec"), namespace)
    return namespace


def test_library_page_imports_only_the_gemlabel_facade():
    for code in python_snippets(REPO / "docs" / "library.md"):
        imported = re.findall(r"^\s*(?:from|import) ([\w.]+)", code, re.M)
        project = [name for name in imported if name.split(".")[0] in ("gem", "pipeline", "jobs")]
        assert not project, f"library.md imports {project}: use gemlabel"
        assert "gemlabel" in imported


def gemlabel_or_skip():
    """The checkout's own gemlabel package. Skipped while the checkout has none: an editable
    install of another checkout (a shared venv) would otherwise answer `import gemlabel` with a
    facade over that checkout's modules."""
    if not (REPO / "gemlabel" / "__init__.py").is_file():
        pytest.skip("the gemlabel package is not in this checkout yet")
    import gemlabel
    assert Path(gemlabel.__file__).resolve().parent == REPO / "gemlabel", gemlabel.__file__
    return gemlabel


def test_library_segmenter_snippets_run_alone_with_random_weights():
    """Each snippet as written, alone, on a random-weight tiny ViT instead of OpenAI's ViT-B-16."""
    gemlabel_or_skip()
    snippets = [code for code in python_snippets(REPO / "docs" / "library.md") if "from_pretrained(" in code]
    assert len(snippets) == 2
    for code in snippets:
        assert code.count('"ViT-B-16", "openai"') == 1
        namespace = run_snippet(code.replace('"ViT-B-16", "openai"', '"gemref-tiny", None'))
        assert isinstance(namespace["regions"], list)
        assert namespace["image"].size == (640, 480)


def demo_project(root: Path) -> Path:
    """A folder like the checkout after the README's install: the demo shards and the config."""
    from jobs.cli import main
    (root / "jobs" / "configs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "configs" / "local.yaml", root / "jobs" / "configs" / "local.yaml")
    assert main(["pack", str(REPO / "tests" / "data" / "voc"), str(root / "demo" / "shards" / "voc"),
                 "--pattern", "*_image.png"]) == 0
    return root


@pytest.mark.usefixtures("ray_session")
def test_library_run_and_read_snippets_run_alone(micro_checkpoint, tmp_path, monkeypatch):
    """The job and read snippets as written, in a checkout after the README's install; the only
    change: load_config also gets the micro model's keys (tests have no weights)."""
    import yaml

    from tests.models import MICRO_CONFIG
    gemlabel = gemlabel_or_skip()
    run, read = [code for code in python_snippets(REPO / "docs" / "library.md")
                 if "run_labeling(" in code or "open_output(" in code]
    monkeypatch.chdir(demo_project(tmp_path))
    micro = {"model": "gemtest-micro", "pretrained": micro_checkpoint, "model_config": str(MICRO_CONFIG),
             "gem.depth": 3, "input_size": [64, 64], "batch_size": 2, "cpus_per_worker": 0.5, "decode_threads": 1,
             "progress": False}
    original = gemlabel.load_config
    monkeypatch.setattr(gemlabel, "load_config",
                        lambda path=None, overrides=None: original(path, {**(overrides or {}), **micro}))
    summary = run_snippet(run)["summary"]
    assert summary.status == "ok" and summary.shards_done == 1 and summary.images == 4
    labels = run_snippet(read)["labels"]
    vocab = yaml.safe_load((REPO / "jobs" / "configs" / "local.yaml").read_text())["vocab"]
    assert labels.class_names == vocab and len(list(labels.all_rows())) == 4


def test_output_page_reading_snippet_runs(labelled_output, tmp_path, monkeypatch):
    """docs/output.md's snippet reads `demo/labels` after the README's first run: here a real output."""
    (code,) = python_snippets(REPO / "docs" / "output.md")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "labels").symlink_to(labelled_output)
    monkeypatch.chdir(tmp_path)
    namespace = run_snippet(code)
    assert namespace["files"] and namespace["table"].num_rows > 0

"""The repository documents itself: every file the README and the guides in docs/ name exists
inside it, every command they show still parses, the README stays a first read; licence and citation."""
import re
import shlex

import pytest
import yaml

from configs.experiment_config import ConfigError
from configs.presets import load_config
from conftest import ROOT
from utils.run.cli import stage_parser

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GUIDES = ["docs/METHOD.md", "docs/cluster.md", "docs/measurement.md", "docs/results.md", "docs/ablations.md"]
# Files a run writes or a user creates (jobs/site.sh) are not the repository's.
PRODUCED = ("seed_S/", "seed_<S>/", "results/", "final/", "models/", "shared/", "corpus/", "WORK_DIR", "work/",
            "jobs/site.sh", "OUT_DIR")


def _named_files(text: str) -> set[str]:
    return set(re.findall(r"`([\w./-]+\.(?:md|py|sh|cff|txt|json))`", text))


def _links(text: str) -> list[str]:
    """Markdown link targets that are not web addresses, without their #anchor."""
    return [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+:", t)]


def test_the_readme_names_the_method_licence_citation_and_every_guide():
    text = (ROOT / "README.md").read_text()
    assert {"docs/METHOD.md", "CITATION.cff"} <= _named_files(text)
    assert "LICENSE" in _links(text)
    assert set(GUIDES) <= set(_links(text)), f"README does not link {set(GUIDES) - set(_links(text))}"
    assert all((ROOT / g).is_file() for g in GUIDES)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_a_doc_names_is_inside_the_repository(doc):
    text = doc.read_text()
    named = _named_files(text)
    outside = [n for n in named if n.startswith("../") or n.startswith("/")]
    assert not outside, f"{doc.name} points outside the repository: {outside}"
    paths = [n for n in named if ("/" in n or n in ("LICENSE", "CITATION.cff")) and not n.startswith(PRODUCED)]
    missing = [n for n in paths if not (ROOT / n).exists()]
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
    # Links are relative to the file that holds them (docs/x.md links ../README.md or cluster.md).
    broken = [t for t in _links(text) if t and not (doc.parent / t).resolve().exists()]
    assert not broken, f"{doc.name} links files that do not exist: {broken}"
    assert all((doc.parent / t).resolve().is_relative_to(ROOT) for t in _links(text) if t)


def test_citation_names_the_method_paper_and_this_software():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    assert paper["title"] == "Monotonicity as an Architectural Bias for Robust Language Models"
    assert [a["family-names"] for a in paper["authors"]] == ["Cooper", "Nadali", "Trivedi", "Velasquez"]
    assert any(i["value"] == "arXiv:2602.02686" for i in paper["identifiers"])
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_commands_give_every_set_one_key(doc):
    """`--set a=1 b=2` is not a form the CLI accepts: each KEY=VALUE needs its own --set."""
    text = doc.read_text().replace("\\\n", " ")
    bad = re.findall(r"--set\s+\S+=\S+\s+[\w.]+=\S+", text)
    assert not bad, f"{doc.name}: {bad}"


def test_the_readme_is_a_first_read():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail to a guide in docs/"


# -- every command the docs show still parses ------------------------------------------------

LAUNCHERS = {"python", "python3", ".venv/bin/python", "torchrun", "bash", "source"}
SCRIPT = re.compile(r"^(?:\./)?((?:scripts|benchmarks)/\w+\.(?:py|sh)|verify_local\.py|test_pipeline_local\.py"
                    r"|run_all\.sh|run_tests\.sh)$")
STAGE = re.compile(r"^scripts/stage_[0-6]_\w+\.py$")
PLACEHOLDER = re.compile(r"\.\.\.|\b[A-Z][A-Z0-9_]*\b")      # VALUE, DIR, N, ...
FENCE = re.compile(r"^\s*```[\w-]*\n(.*?)^\s*```", re.M | re.S)


def _argv(line: str) -> list[str] | None:
    """The words of a shell line that starts a program (None if it does not): `# comments` dropped,
    VAR=value prefixes dropped, shell variables ($SCRATCH) replaced by plain paths."""
    words = line.split()
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        words.pop(0)
    if not words or words[0] not in LAUNCHERS:
        return None
    line = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: "/" + m.group(1).lower(), line)
    argv = shlex.split(line, comments=True)
    while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
        argv.pop(0)
    return argv


def _commands(fenced: bool) -> list[tuple[str, list[str]]]:
    """(doc name, argv) of every command the docs show: with `fenced`, each line of a fenced code
    block (backslash continuations joined); otherwise each inline `code span` that is a command
    (those may hold placeholders and [optional] parts, so only their flags are checked)."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        if fenced:
            lines = [ln for block in FENCE.findall(text) for ln in block.replace("\\\n", " ").splitlines()]
        else:
            lines = [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", FENCE.sub("", text))]
        out += [(doc.name, argv) for argv in map(_argv, lines) if argv]
    return out


def _script(argv: list[str]) -> tuple[str | None, list[str]]:
    """The repository script a command runs and the arguments after it (None: not ours)."""
    for i, word in enumerate(argv):
        m = SCRIPT.match(word)
        if m:
            return m.group(1), argv[i + 1:]
    return None, []


def _flags_of(script: str) -> set[str]:
    """Flags a script accepts, read from its source: argparse's add_argument("--x" (also in the shared
    stage parser of utils/run/cli.py when the script uses it) and bash's `--x)` cases."""
    text = (ROOT / script).read_text()
    if re.search(r"stage_parser|done_stages|run_stage", text):
        text += (ROOT / "utils/run/cli.py").read_text()
    return set(re.findall(r"""add_argument\(\s*["'](--[\w-]+)""", text)) | \
        set(re.findall(r"""(?:^|[\s|])(--[\w-]+)(?:\|[\w-]+)*\)""", text, re.M))


def _sets(args: list[str]) -> list[tuple[str, str]]:
    pairs = [args[i + 1] for i, a in enumerate(args[:-1]) if a.strip("[]") == "--set"]
    return [tuple(p.split("=", 1)) for p in pairs if "=" in p]


def _ours(commands):
    return [(doc, *_script(argv)) for doc, argv in commands if _script(argv)[0]]


OURS = _ours(_commands(fenced=True))
INLINE = _ours(_commands(fenced=False))


def test_the_docs_show_commands_to_check():
    assert len(OURS) >= 10, f"only {len(OURS)} repository commands found in the docs' code blocks"
    assert len(INLINE) >= 10, f"only {len(INLINE)} repository commands found in the docs' inline code"
    assert any(STAGE.match(s) for _, s, _ in OURS)


def _unknown_flags(script: str, args: list[str]) -> set[str]:
    used = {a.strip("[]").split("=")[0] for a in args if a.strip("[]").startswith("--")}
    return used - _flags_of(script)


@pytest.mark.parametrize("doc,script,args", OURS, ids=[f"{d}:{s}" for d, s, _ in OURS])
def test_a_doc_command_still_parses(doc, script, args):
    assert (ROOT / script).is_file(), f"{doc} runs {script}, which does not exist"
    if STAGE.match(script):
        try:
            parsed = stage_parser("x").parse_args(args)
        except SystemExit as e:
            pytest.fail(f"{doc}: {script} {' '.join(args)} does not parse (exit {e.code})")
        preset = parsed.preset
    else:
        unknown = _unknown_flags(script, args)
        assert not unknown, f"{doc}: {script} does not take {sorted(unknown)}"
        preset = args[args.index("--preset") + 1] if "--preset" in args else "tiny"
    concrete = [(k, v.strip("[]")) for k, v in _sets(args)
                if not PLACEHOLDER.search(k) and not PLACEHOLDER.search(v.strip("[]"))]
    try:
        load_config(preset, concrete)
    except ConfigError as e:
        pytest.fail(f"{doc}: {script} --preset {preset} with {concrete}: {e}")


@pytest.mark.parametrize("doc,script,args", INLINE, ids=[f"{d}:{s}" for d, s, _ in INLINE])
def test_an_inline_command_names_a_script_and_flags_that_exist(doc, script, args):
    assert (ROOT / script).is_file(), f"{doc} runs {script}, which does not exist"
    unknown = _unknown_flags(script, args)
    assert not unknown, f"{doc}: {script} does not take {sorted(unknown)}"

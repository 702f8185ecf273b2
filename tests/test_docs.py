"""The repository documents itself: every file the README names exists inside it; licence and citation."""
import re

import yaml

from conftest import ROOT


def test_every_file_the_readme_names_is_inside_the_repository():
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`([\w./-]+\.(?:md|py|sh|cff|txt|json))`", text)) | {"LICENSE"}
    assert {"docs/METHOD.md", "CITATION.cff"} <= named
    outside = [n for n in named if n.startswith("../") or n.startswith("/")]
    assert not outside, f"README points outside the repository: {outside}"
    # Files a run writes or a user creates (jobs/site.sh) are not the repository's.
    produced = ("seed_S/", "results/", "WORK_DIR", "work/", "jobs/site.sh")
    paths = [n for n in named if ("/" in n or n in ("LICENSE", "CITATION.cff")) and not n.startswith(produced)]
    missing = [n for n in paths if not (ROOT / n).exists()]
    assert not missing, f"README names files that do not exist: {missing}"


def test_citation_names_the_method_paper_and_this_software():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    assert paper["title"] == "Monotonicity as an Architectural Bias for Robust Language Models"
    assert [a["family-names"] for a in paper["authors"]] == ["Cooper", "Nadali", "Trivedi", "Velasquez"]
    assert any(i["value"] == "arXiv:2602.02686" for i in paper["identifiers"])
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_readme_commands_give_every_set_one_key():
    """`--set a=1 b=2` is not a form the CLI accepts: each KEY=VALUE needs its own --set."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    bad = re.findall(r"--set\s+\S+=\S+\s+[\w.]+=\S+", text)
    assert not bad, bad

"""The README's promises and the docs' links hold; the repository cites only itself.

Config keys are checked against docs/configuration.md by tests/test_config_docs.py; this file
checks the README quickstart, CI's entry point, links, and that the troubleshooting and
observability pages cover every SQLSTATE, metric and stable log key the code has.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from waypoint import errors
from waypoint.observability.log import STABLE_KEYS
from waypoint.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
OWN_DOCS = [
    "policy.md",
    "troubleshooting.md",
    "comparison.md",
    "architecture.md",
    "observability.md",
    "design.md",
    "protocol.md",
    "localapi.md",
]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _local_links(path: Path) -> list[str]:
    return [
        target
        for target in _LINK.findall(path.read_text())
        if not re.match(r"^[a-z]+:", target) and not target.startswith("#")
    ]


def test_readme_quickstart_is_the_two_commands_verbatim() -> None:
    text = README.read_text()
    block = re.search(r"## Quickstart\s+```sh\n(.*?)```", text, flags=re.DOTALL)
    assert block, "README has no Quickstart sh block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["./dev.sh demo", "./dev.sh test"]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line for line in ci.splitlines() if not line.lstrip().startswith("#")]
    assert any(re.search(r"(^|\s)\./dev\.sh test(\s|$)", line) for line in lines), ci


def test_dev_sh_demo_reaches_waypoint_demo() -> None:
    dev = (ROOT / "dev.sh").read_text()
    assert 'exec just "${@:-test}"' in dev
    justfile = (ROOT / "Justfile").read_text()
    recipe = re.search(r"^demo \*ARGS:\n((?:[ \t]+.*\n)+)", justfile, flags=re.MULTILINE)
    assert recipe, "the Justfile has no demo recipe"
    assert "waypoint demo {{ARGS}}" in recipe.group(1)


@pytest.mark.parametrize("doc", ["README.md", *(f"docs/{d}" for d in OWN_DOCS)])
def test_every_local_link_resolves_to_a_file(doc: str) -> None:
    path = ROOT / doc
    links = _local_links(path)
    if doc == "README.md":
        assert len(links) >= 8  # the docs index is there
    missing = [
        target
        for target in links
        if not (path.parent / target.split("#")[0]).resolve().is_file()
    ]
    assert missing == [], f"{doc} links to missing files: {missing}"


def test_readme_indexes_every_doc_page() -> None:
    linked = {Path(t.split("#")[0]).name for t in _local_links(README) if t.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set(), f"docs pages missing from the README index: {pages - linked}"


def test_troubleshooting_covers_every_sqlstate_waypoint_sends() -> None:
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    codes = {
        value
        for name, value in vars(errors).items()
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"[0-9A-Z]{5}", value)
    }
    assert {"28000", "42501", "58000", "08004"} <= codes
    missing = sorted(code for code in codes if f"`{code}`" not in text)
    assert missing == [], f"SQLSTATEs missing from docs/troubleshooting.md: {missing}"


def test_troubleshooting_quotes_the_refusal_messages() -> None:
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    samples = [
        errors.unknown_peer(),
        errors.not_authorized_listener("L"),
        errors.not_authorized_database("D", "L"),
        errors.raw_sql_not_allowed("L"),
        errors.backend_unavailable("L"),
        errors.backend_login_failed(),
        errors.identity_unavailable("tailscaled"),
        errors.state_unavailable(),
        errors.tls_required(),
        errors.replication_refused(),
        errors.shutting_down(),
        errors.not_accepting(),
    ]
    for refusal in samples:
        assert refusal.message in text, refusal.message
    assert "provisioning your database role failed (correlation id" in text


def test_observability_doc_lists_every_metric_and_stable_log_key() -> None:
    text = (ROOT / "docs" / "observability.md").read_text()
    families = list(text_string_to_metric_families(Metrics().render().decode()))
    assert len(families) >= 10
    for family in families:
        if family.name.endswith("_created"):  # prometheus-client's creation timestamps
            continue
        exposed = f"{family.name}_total" if family.type == "counter" else family.name
        assert f"`{exposed}`" in text, f"metric {exposed} is not documented"
    for key in STABLE_KEYS:
        assert f"`{key}`" in text, f"log key {key} is not documented"


# Citations of what a reader of this repository does not have: the product spec, the notes
# beside it, and the issue tracker. What a comment or page needs from them lives in docs/.
_OUTSIDE_CITATION = re.compile(
    r"\bSPEC\b"
    r"|(?<!\d )§"  # a section sign not after a standard's number ("RFC 5802 §3")
    r"|\b(?:PERF|ARCHITECTURE|STYLE)\.md\b"
    r"|tailscale-localapi"
    r"|/work/shared"
    r"|\b[Ii]ssues? \d"
    r"|\b[Ii]ssue #\d"
)
_CITATION_ROOTS = ["waypoint", "tests", "bench", "docs", "contrib", ".ci"]
_CITATION_FILES = ["README.md", "Justfile", "dev.sh", "pyproject.toml", "setup.py"]
_TEXT_SUFFIXES = {".py", ".md", ".c", ".h", ".toml", ".sh", ".json", ".txt", ".cfg", ".ini", ""}
_SKIP_DIRS = {"__pycache__", ".hypothesis", ".pytest_cache", "build"}


def _cited_files() -> list[Path]:
    files = [ROOT / name for name in _CITATION_FILES]
    for root in _CITATION_ROOTS:
        for path in sorted((ROOT / root).rglob("*")):
            if (
                path.is_file()
                and path.suffix in _TEXT_SUFFIXES
                and not _SKIP_DIRS & set(path.relative_to(ROOT).parts)
                and path != Path(__file__).resolve()
            ):
                files.append(path)
    return files


def test_the_citation_pattern_catches_every_outside_reference() -> None:
    for cited in [
        "(SPEC §4 step 7)",
        "see SPEC",
        "as §5 says",
        "PERF.md",
        "tailscale-localapi.md",
        "ARCHITECTURE.md",
        "STYLE.md",
        "issue 7",
        "Issue 7's bars",
        "issues 4 and 8",
        "/work/shared/SPEC.md",
    ]:
        assert _OUTSIDE_CITATION.search(cited), cited
    for fine in ["RFC 5802 §3", "SPEC_EXAMPLE", "spec_example.toml", "docs/design.md", "issued"]:
        assert not _OUTSIDE_CITATION.search(fine), fine


def test_the_repository_cites_only_itself() -> None:
    files = _cited_files()
    assert len(files) > 100 and ROOT / "waypoint" / "app.py" in files
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(
            path.read_text(encoding="utf-8", errors="replace").splitlines(), 1
        )
        if _OUTSIDE_CITATION.search(line)
    ]
    assert hits == [], "cite a page in docs/ instead:\n" + "\n".join(hits)


_CONFLICT_MARKER = re.compile(r"^(<{7} |={7}$|>{7} )", re.M)


def test_no_merge_conflict_markers_are_left_in_the_tree() -> None:
    files = _cited_files()
    hits = [
        str(path.relative_to(ROOT))
        for path in files
        if _CONFLICT_MARKER.search(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert hits == [], "unresolved merge conflict in: " + ", ".join(hits)

"""docs/security.md names, for every threat, the tests that show its mitigation: every
test it names exists, and every fuzz target it names is a file. (So the review cannot
drift from the suite when tests are renamed.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
_TEST_REF = re.compile(r"`(test_[a-z0-9_]+\.py)::([A-Za-z_][A-Za-z0-9_]*)`")
_TARGET_REF = re.compile(r"`(fuzz_[a-z_]+\.py)`")


def _refs() -> list[tuple[str, str]]:
    return sorted(set(_TEST_REF.findall(DOC.read_text())))


def test_the_security_review_names_tests() -> None:
    assert len(_refs()) >= 50


@pytest.mark.parametrize(("file", "name"), _refs(), ids=lambda v: str(v))
def test_every_test_named_in_the_security_review_exists(file: str, name: str) -> None:
    path = ROOT / "tests" / file
    assert path.is_file(), f"docs/security.md names {file}, which does not exist"
    source = path.read_text()
    defined = re.search(
        rf"^(?:async def|def|class) {re.escape(name)}\b|^{re.escape(name)} = ", source, re.MULTILINE
    )
    assert defined, f"docs/security.md names {file}::{name}, which is not defined there"


def test_every_fuzz_target_named_in_the_security_review_exists() -> None:
    targets = set(_TARGET_REF.findall(DOC.read_text()))
    assert len(targets) == 8
    for target in targets:
        assert (ROOT / "tests" / "fuzz" / target).is_file(), target

"""identity_from_whois: untrusted whois JSON → Identity, or MalformedResponse (never a crash)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.identity import Identity, MalformedResponse, identity_from_whois

CAP = "redo.com/cap/waypoint"


def body(**changes: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "Node": {
            "ID": 1,
            "StableID": "n1CNTRL",
            "Name": "alice-laptop.tail1234.ts.net.",
            "User": 2,
            "Addresses": ["100.101.102.103/32"],
            "Tags": None,
            "ComputedName": "alice-laptop",
            "ComputedNameWithHost": "alice-laptop",
            "Hostinfo": {"OS": "linux"},
            "SomethingNew": {"x": [1, 2]},
        },
        "UserProfile": {
            "ID": 2,
            "LoginName": "alice@example.com",
            "DisplayName": "Alice",
            "ProfilePicURL": "",
            "Groups": ["group:eng"],
        },
        "CapMap": {CAP: [{"backends": {}}]},
    }
    for path, value in changes.items():
        target = b
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return b


_DELETE: Any = object()


def test_full_body_gives_identity_and_ignores_unknown_fields() -> None:
    assert identity_from_whois(body(), CAP) == Identity(
        login="alice@example.com", node="alice-laptop", tags=(), rules=({"backends": {}},)
    )


@pytest.mark.parametrize(
    ("changes", "node"),
    [
        ({"Node__ComputedName": ""}, "alice-laptop"),
        ({"Node__ComputedName": None, "Node__Name": "build-box.tail9.ts.net."}, "build-box"),
        ({"Node__ComputedName": _DELETE, "Node__Name": "solo"}, "solo"),
        ({"Node__ComputedName": "short"}, "short"),
    ],
)
def test_node_name_prefers_computed_name_then_first_label(
    changes: dict[str, Any], node: str
) -> None:
    assert identity_from_whois(body(**changes), CAP).node == node


@pytest.mark.parametrize(
    "changes",
    [
        {"CapMap": None},
        {"CapMap": _DELETE},
        {"CapMap": {}},
        {"CapMap": {CAP: None}},
        {"CapMap": {"other": [{"x": 1}]}},
    ],
)
def test_missing_capability_means_no_rules(changes: dict[str, Any]) -> None:
    assert identity_from_whois(body(**changes), CAP).rules == ()


def test_tags_null_absent_or_list() -> None:
    assert identity_from_whois(body(Node__Tags=None), CAP).tags == ()
    assert identity_from_whois(body(Node__Tags=_DELETE), CAP).tags == ()
    assert identity_from_whois(body(Node__Tags=["tag:a", "tag:b"]), CAP).tags == ("tag:a", "tag:b")


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"UserProfile": _DELETE}, "no UserProfile"),
        ({"UserProfile": None}, "no UserProfile"),
        ({"UserProfile": []}, "UserProfile is a JSON array"),
        ({"UserProfile__LoginName": _DELETE}, "LoginName"),
        ({"UserProfile__LoginName": ""}, "LoginName"),
        ({"UserProfile__LoginName": 7}, "LoginName"),
        ({"Node": _DELETE}, "no Node"),
        ({"Node": "x"}, "Node is a JSON string"),
        ({"Node__ComputedName": "", "Node__Name": ""}, "neither Node.ComputedName nor a Node.Name"),
        ({"Node__ComputedName": 5}, "ComputedName is a JSON number"),
        ({"Node__ComputedName": "", "Node__Name": ["a"]}, "Node.Name is a JSON array"),
        ({"Node__Tags": "tag:a"}, "Tags is not an array of strings"),
        ({"Node__Tags": [1]}, "Tags is not an array of strings"),
        ({"CapMap": []}, "CapMap is a JSON array"),
        ({"CapMap": {CAP: {"backends": {}}}}, "is a JSON object, not an array"),
        ({"CapMap": {CAP: ["rule"]}}, "[0] is a JSON string, not an object"),
        ({"CapMap": {CAP: [{}, None]}}, "[1] is a JSON null, not an object"),
    ],
)
def test_wrong_shapes_are_malformed_responses(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(MalformedResponse) as info:
        identity_from_whois(body(**changes), CAP)
    assert fragment in str(info.value)
    assert info.value.refusal.sqlstate == "08004"


@pytest.mark.parametrize("value", [None, [], "x", 1, True])
def test_non_object_answer_is_malformed(value: Any) -> None:
    with pytest.raises(MalformedResponse):
        identity_from_whois(value, CAP)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

PATHS = [
    (),
    ("Node",),
    ("UserProfile",),
    ("CapMap",),
    ("Node", "Name"),
    ("Node", "ComputedName"),
    ("Node", "Tags"),
    ("UserProfile", "LoginName"),
    ("CapMap", CAP),
]


@given(path=st.sampled_from(PATHS), value=json_values)
def test_any_json_at_any_field_gives_identity_or_malformed(
    path: tuple[str, ...], value: Any
) -> None:
    doc: Any = copy.deepcopy(body())
    if path:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    else:
        doc = value
    doc = json.loads(json.dumps(doc))  # only what a JSON decoder can produce
    try:
        ident = identity_from_whois(doc, CAP)
    except MalformedResponse:
        return
    assert isinstance(ident.login, str) and ident.login
    assert isinstance(ident.node, str) and ident.node
    assert all(isinstance(t, str) for t in ident.tags)
    assert all(isinstance(r, dict) for r in ident.rules)


@given(doc=json_values)
def test_arbitrary_json_documents_never_crash(doc: Any) -> None:
    # Only MalformedResponse may escape (a KeyError/TypeError fails the test).
    try:
        ident = identity_from_whois(doc, CAP)
    except MalformedResponse as exc:
        assert exc.refusal.sqlstate == "08004"
    else:
        assert isinstance(ident, Identity) and ident.login and ident.node

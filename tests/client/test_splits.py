"""Split expressions on the client: the shared grammar (batchd.wire), kfold, early refusals."""

from __future__ import annotations

import pytest

import batchd
from batchd import Client, kfold
from batchd.testing import MockRequest, MockResponse, MockTransport
from batchd.wire import MAX_SPLIT_CHARS, SplitBound, SplitSlice, format_split, parse_split


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("[:80%]", "[:80%]"),
        ("[80%:]", "[80%:]"),
        ("[10%:20%]", "[10%:20%]"),
        ("[:1000]", "[:1000]"),
        ("[:20%]+[40%:]", "[:20%]+[40%:]"),
        (" [ 0% : 80 % ] ", "[:80%]"),  # blanks between tokens; a 0 start is no start
        ("[0:100%]", "[:]"),
        ("[5:20%]", "[5:20%]"),  # mixed units: only the server (the count) can order them
    ],
)
def test_accepted_splits_and_their_canonical_text(text: str, canonical: str) -> None:
    assert format_split(parse_split(text)) == canonical


def test_parsed_slices() -> None:
    assert parse_split("[10%:1000]+[:5]") == (
        SplitSlice(SplitBound(10, True), SplitBound(1000, False)),
        SplitSlice(None, SplitBound(5, False)),
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train[:80%]", "drop the name 'train' and write '[:80%]'"),
        ("[-20%:]", "negative bounds are not supported: write '[80%:]'"),
        ("[:33.3%]", "percents are whole numbers"),
        ("[5]", "a slice needs a ':'"),
        ("[80%:20%]", "is empty: its start is not before its stop"),
        ("[50%:50%]", "is empty"),
        ("[:0]", "is empty: it stops at 0"),
        ("[:101%]", "101%: a percent bound is 0% .. 100%"),
        ("", "split is empty"),
        ("80%", "write [start:stop]"),
        ("[:10%]+", "slice 2 (''): write [start:stop]"),
        ("+".join(["[:1]"] * 40), "40 slices; at most 32"),
        ("[:20%][40%:]", "join slices with '+'"),
        ("[" + "1" * MAX_SPLIT_CHARS + ":]", f"at most {MAX_SPLIT_CHARS}"),
    ],
)
def test_malformed_splits_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_split(text)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("n_folds", "expected"),
    [
        (2, [("[50%:]", "[:50%]"), ("[:50%]", "[50%:]")]),
        (3, [("[33%:]", "[:33%]"), ("[:33%]+[67%:]", "[33%:67%]"), ("[:67%]", "[67%:]")]),
        (5, [("[20%:]", "[:20%]"), ("[:20%]+[40%:]", "[20%:40%]")]),
    ],
)
def test_kfold_expressions(n_folds: int, expected: list[tuple[str, str]]) -> None:
    assert [kfold(n_folds, f) for f in range(len(expected))] == expected
    assert kfold(n_folds, n_folds - 1)[1].endswith("%:]")


@pytest.mark.parametrize(("n_folds", "fold"), [(1, 0), (101, 0), (5, 5), (5, -1), (True, 0)])
def test_kfold_refuses_what_cannot_be_folded(n_folds: int, fold: int) -> None:
    with pytest.raises(ValueError, match=r"n_folds|fold"):
        kfold(n_folds, fold)


def _no_server(req: MockRequest) -> MockResponse:
    raise AssertionError(f"nothing may be sent for a bad split, got {req.path}")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"split": "[80%:20%]"}, "is empty"),
        ({"split": "train[:80%]"}, "drop the name"),
        ({"split": 0.8}, "must be a string"),
        ({"stratify": "label"}, "give split too"),
        ({"split": "[:80%]", "split_seed": -1}, "split_seed must be"),
        ({"split": "[:80%]", "stratify": ""}, "stratify must be a field name"),
    ],
)
def test_client_refuses_a_bad_split_before_any_request(
    kwargs: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValueError) as err:
        Client("http://batchd.test", "toy", transport=MockTransport(_no_server), **kwargs)  # type: ignore[arg-type]
    assert needle in str(err.value)


def test_the_split_travels_in_the_url_only_when_given() -> None:
    seen: list[MockRequest] = []

    def handler(req: MockRequest) -> MockResponse:
        seen.append(req)
        return MockResponse.json({"error": "unknown_dataset", "detail": "x"}, status=404)

    for kwargs in ({}, {"split": " [0%:80%] ", "split_seed": 3, "stratify": "label"}):
        with pytest.raises(batchd.NotFoundError):
            Client(
                "http://batchd.test", "toy", transport=MockTransport(handler), **kwargs
            ).refresh()  # type: ignore[arg-type]
    assert not {"split", "split_seed", "stratify"} & set(seen[0].query)
    assert {k: seen[1].query[k] for k in ("split", "split_seed", "stratify")} == {
        "split": "[:80%]",
        "split_seed": "3",
        "stratify": "label",
    }


def test_state_saved_before_splits_loads_as_the_whole_pack() -> None:
    client = Client("http://batchd.test", "toy", transport=MockTransport(_no_server))
    state = client.state_dict()
    assert state["params"]["split"] is None
    for key in ("split", "split_seed", "stratify"):
        del state["params"][key]
    client.load_state_dict(state)
    other = Client("http://batchd.test", "toy", split="[:80%]", transport=MockTransport(_no_server))
    with pytest.raises(batchd.StateError, match=r"split='\[:80%\]'"):
        client.load_state_dict(other.state_dict())

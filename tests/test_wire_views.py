"""fedsb.wire.decode_update_views (the aggregator's hot path) agrees with decode_update."""

from __future__ import annotations

import random

import pytest
import torch
from test_wire import ALL_DTYPES, CORRUPT_CASES, META, VALID, bert_base_update, mixed_update

from fedsb.errors import WireFormatError
from fedsb.wire import decode_update, decode_update_views, encode_update


def outcome(decoder, message: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]] | str:  # type: ignore[no-untyped-def]
    """The decoded message, or the WireFormatError text."""
    try:
        return decoder(message, dtypes=ALL_DTYPES)
    except WireFormatError as err:
        return str(err)


def assert_same_outcome(message: bytes) -> None:
    want, got = outcome(decode_update, message), outcome(decode_update_views, message)
    if isinstance(want, str) or isinstance(got, str):
        assert got == want
        return
    assert got[1] == want[1]
    assert list(got[0]) == list(want[0])
    assert all(torch.equal(got[0][k], want[0][k]) for k in want[0])
    assert all(got[0][k].dtype == want[0][k].dtype for k in want[0])


def test_bert_base_update_decodes_bit_exact_without_aliasing_the_input() -> None:
    message = bytearray(VALID)
    state, meta = decode_update_views(message)
    assert meta == META
    expected = bert_base_update()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    message[-4:] = b"\xff\xff\xff\xff"  # the decoded tensors are a private copy
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("case", CORRUPT_CASES, ids=[c[0] for c in CORRUPT_CASES])
def test_every_corrupt_message_is_rejected_with_the_same_reason(case) -> None:  # type: ignore[no-untyped-def]
    _, message, match = case
    with pytest.raises(WireFormatError, match=match):
        decode_update_views(message)
    assert_same_outcome(message)


def test_single_byte_mutations_give_the_same_outcome() -> None:
    rng = random.Random(7)
    for message in (encode_update(mixed_update(), {"round": "1"}), VALID):
        for _ in range(800):
            mutated = bytearray(message)
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            assert_same_outcome(bytes(mutated))

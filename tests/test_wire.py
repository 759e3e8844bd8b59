"""Tests for fedsb.wire: bit-exact round trips, determinism, size budget and hostile input."""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch

from fedsb import wire
from fedsb.errors import WireFormatError
from fedsb.wire import (
    DEFAULT_MAX_BYTES,
    FORMAT_VERSION,
    decode_update,
    encode_update,
    encoded_overhead,
)

BERT_MODULES = ("self.query", "self.key", "self.value", "output.dense")
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64)
META = {
    "job": "sst2-bert-base",
    "round": "17",
    "client": "edge-007",
    "rank": "16",
    "examples": "1024",
    "loss": "0.341275",
    "msg_id": "c965dfb40e92491aad3840e542c250b7",
}


def bert_base_update(rank: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """48 rank x rank R matrices named like the adapted BERT-base attention modules."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"bert.encoder.layer.{i}.attention.{m}.R": torch.randn(rank, rank, generator=gen)
        for i in range(12)
        for m in BERT_MODULES
    }


def r8_with_head(seed: int = 0) -> dict[str, torch.Tensor]:
    """36 rank-8 R blocks (query, value, output per layer) plus a 21-class head on 384 features."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        f"bert.encoder.layer.{i}.attention.{m}.R": torch.randn(8, 8, generator=gen)
        for i in range(12)
        for m in ("self.query", "self.value", "output.dense")
    }
    state["classifier.weight"] = torch.randn(21, 384, generator=gen)
    state["classifier.bias"] = torch.randn(21, generator=gen)
    return state


def mixed_update() -> dict[str, torch.Tensor]:
    """Mixed ranks, dtypes, a 0-d scalar and an empty tensor."""
    gen = torch.Generator().manual_seed(1)
    return {
        "layer.0.q.R": torch.randn(4, 4, generator=gen),
        "layer.1.q.R": torch.randn(8, 8, generator=gen),
        "layer.2.q.R": torch.randn(8, 8, generator=gen),
        "head.weight": torch.randn(3, 384, generator=gen).to(torch.float16),
        "head.bias": torch.randn(3, generator=gen).to(torch.bfloat16),
        "scale": torch.tensor(0.5, dtype=torch.float64),
        "steps": torch.tensor([3, -1, 2**40], dtype=torch.int64),
        "empty": torch.zeros(0, 5),
    }


def raw_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data in `state`."""
    return sum(t.numel() * t.element_size() for t in state.values())


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bits."""
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


# ---------------------------------------------------------------- helpers for hostile input


def split(message: bytes) -> tuple[dict[str, Any], bytes]:
    """Header JSON and data section of a message."""
    (length,) = struct.unpack_from("<Q", message)
    return json.loads(message[8 : 8 + length]), message[8 + length :]


def join(header: dict[str, Any], data: bytes) -> bytes:
    """Re-assemble a message with a correct length prefix."""
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


def rewrite(message: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Apply `edit` to the parsed header of `message` and re-assemble it."""
    header, data = split(message)
    edit(header)
    return join(header, data)


def pack_layout(value: Any) -> str:
    """Layout entry for an arbitrary JSON value, packed as the encoder does."""
    return base64.b64encode(zlib.compress(json.dumps(value).encode(), 9)).decode()


def b64z(raw: bytes, cut: int = 0, tail: bytes = b"") -> str:
    """base64 of zlib-compressed `raw`, optionally with `cut` bytes dropped or `tail` appended."""
    blob = zlib.compress(raw, 9)
    return base64.b64encode(blob[: len(blob) - cut] + tail).decode()


def set_layout(value: Any) -> Callable[[dict[str, Any]], None]:
    """Header edit replacing the layout entry with `value` packed."""
    return lambda h: h["__metadata__"].__setitem__(wire.LAYOUT_KEY, pack_layout(value))


def set_meta(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Header edit setting one raw __metadata__ entry."""
    return lambda h: h["__metadata__"].__setitem__(key, value)


def flip(message: bytes, index: int, mask: int = 0x01) -> bytes:
    """`message` with the byte at `index` xor-ed with `mask`."""
    out = bytearray(message)
    out[index] ^= mask
    return bytes(out)


def with_length(message: bytes, length: int) -> bytes:
    """`message` with its 8-byte header length field replaced."""
    return struct.pack("<Q", length) + message[8:]


# ---------------------------------------------------------------- round trips


def test_round_trip_bert_base_is_bit_exact() -> None:
    """The 48 x 16 x 16 update and its metadata come back exactly."""
    state = bert_base_update()
    got, meta = decode_update(encode_update(state, META))
    assert_same_state(got, state)
    assert meta == META


def test_round_trip_mixed_shapes_and_dtypes() -> None:
    """Several groups, every supported dtype, 0-d and empty tensors round-trip bit-exactly."""
    state = mixed_update()
    got, meta = decode_update(encode_update(state), dtypes=ALL_DTYPES)
    assert_same_state(got, state)
    assert got["scale"].shape == ()
    assert meta == {}


def test_round_trip_r8_with_head() -> None:
    """Rank-8 blocks plus a classifier head round-trip."""
    state = r8_with_head()
    got, meta = decode_update(encode_update(state, META))
    assert_same_state(got, state)
    assert meta == META


def test_empty_state_carries_metadata_only() -> None:
    """No tensors is a valid message."""
    assert decode_update(encode_update({}, {"round": "3"})) == ({}, {"round": "3"})


def test_decoded_tensors_are_contiguous_clones() -> None:
    """Decoded tensors own their storage: no views into the stacked group or the input."""
    got, _ = decode_update(encode_update(bert_base_update()))
    pointers = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(pointers) == 48
    assert all(t.is_contiguous() and t.storage_offset() == 0 for t in got.values())


def test_non_contiguous_and_grad_tensors_encode() -> None:
    """A transposed view and a requires_grad leaf encode as their values."""
    base = torch.arange(12.0).reshape(3, 4)
    state = {"t": base.t(), "g": torch.ones(2, requires_grad=True)}
    got, _ = decode_update(encode_update(state))
    assert torch.equal(got["t"], base.t()) and torch.equal(got["g"], torch.ones(2))


def test_accepts_bytearray_and_memoryview() -> None:
    """Transport buffers other than bytes decode the same."""
    message = encode_update(bert_base_update(), META)
    for buffer in (bytearray(message), memoryview(message)):
        got, meta = decode_update(buffer)
        assert_same_state(got, bert_base_update())
        assert meta == META


def test_unicode_names_and_metadata() -> None:
    """Non-ASCII names and metadata survive."""
    state = {"modèle.ß.R": torch.ones(2, 2), "模型.R": torch.zeros(2, 2)}
    got, meta = decode_update(encode_update(state, {"note": "λ=0.1"}))
    assert_same_state(got, state)
    assert meta == {"note": "λ=0.1"}


def test_message_is_plain_safetensors() -> None:
    """Any safetensors reader sees one stacked tensor per group plus the reserved metadata."""
    message = encode_update(bert_base_update(), META)
    loaded = safetensors.torch.load(message)
    assert list(loaded) == ["g0"]
    assert loaded["g0"].shape == (48, 16, 16)
    header, _ = split(message)
    assert header["__metadata__"][wire.FORMAT_KEY] == FORMAT_VERSION
    assert set(header["__metadata__"]) == set(META) | {wire.FORMAT_KEY, wire.LAYOUT_KEY}


def test_groups_are_ordered_for_alignment() -> None:
    """Groups with wider items come first, so every tensor's data starts aligned to its size."""
    header, _ = split(encode_update(mixed_update()))
    dtypes = [header[f"g{i}"]["dtype"] for i in range(len(header) - 1)]
    assert dtypes == ["F64", "I64", "F32", "F32", "F32", "BF16", "F16"]


# ---------------------------------------------------------------- determinism and size


def test_encoding_is_deterministic_across_insertion_order() -> None:
    """Reversed dict order of tensors and metadata gives byte-identical output."""
    state = mixed_update()
    reversed_state = dict(reversed(list(state.items())))
    reversed_meta = dict(reversed(list(META.items())))
    assert encode_update(state, META) == encode_update(reversed_state, reversed_meta)


def test_bert_base_update_fits_size_budget() -> None:
    """48 x 16 x 16 float32 with realistic metadata stays within 1% + 512 bytes of raw."""
    state = bert_base_update()
    assert raw_bytes(state) == 49152
    encoded = encode_update(state, META)
    assert len(encoded) <= 1.01 * 49152 + 512
    assert len(encoded) == 49632
    assert encoded_overhead(state, META) == 480


def test_r8_with_head_overhead() -> None:
    """Three groups (8x8 blocks, head weight, head bias): overhead stays a few hundred bytes."""
    state = r8_with_head()
    assert raw_bytes(state) == 41556
    assert encoded_overhead(state, META) == 632
    assert len(encode_update(state, META)) <= 1.01 * raw_bytes(state) + 1024


# ---------------------------------------------------------------- encoder rejections


@pytest.mark.parametrize(
    ("state", "meta", "match"),
    [
        ({}, {"fedsb.layout": "x"}, "reserved prefix"),
        ({}, {"fedsb.anything": "x"}, "reserved prefix"),
        ({}, {"round": 3}, "metadata value for 'round' must be str, got int"),
        ({}, {3: "x"}, "metadata key 3 must be str"),
        ({}, ["round"], "metadata must be a mapping"),
        ({"a": torch.zeros(2, dtype=torch.int32)}, None, "dtype torch.int32; supported"),
        ({"a": [1.0]}, None, "not a torch.Tensor"),
        ({"": torch.zeros(2)}, None, "non-empty str"),
        ({1: torch.zeros(2)}, None, "non-empty str"),
        ({"a": torch.zeros(2).to_sparse()}, None, "only dense tensors"),
        ({"a\ud800": torch.zeros(2)}, None, "not valid Unicode"),
        ({}, {"k": "\ud800"}, "not valid Unicode"),
    ],
)
def test_encode_rejects(state: Any, meta: Any, match: str) -> None:
    """Bad names, dtypes and metadata are refused at the source with a clear message."""
    with pytest.raises(WireFormatError, match=match):
        encode_update(state, meta)


# ---------------------------------------------------------------- decoder rejections

VALID = encode_update(bert_base_update(), META)
HEADER_LEN = struct.unpack_from("<Q", VALID)[0]


def _nan_state() -> dict[str, torch.Tensor]:
    state = bert_base_update()
    state["bert.encoder.layer.5.attention.self.key.R"][3, 4] = float("nan")
    return state


def _inf_state() -> dict[str, torch.Tensor]:
    state = bert_base_update()
    state["bert.encoder.layer.0.attention.output.dense.R"][0, 0] = float("-inf")
    return state


def _layout_value(message: bytes) -> list[Any]:
    """The decoded layout JSON of `message`."""
    packed = split(message)[0]["__metadata__"][wire.LAYOUT_KEY]
    return json.loads(zlib.decompress(base64.b64decode(packed)))


def _rename_group(header: dict[str, Any]) -> None:
    header["x0"] = header.pop("g0")


def _huge_tensor(header: dict[str, Any]) -> None:
    header["g0"] = {
        "dtype": "F32",
        "shape": [48, 16, 2**20],
        "data_offsets": [0, 48 * 16 * 2**20 * 4],
    }


def _duplicate_names() -> Any:
    counts, prefixes, suffixes = _layout_value(VALID)
    return set_layout([counts, prefixes[:-1] + [0], suffixes[:-1] + [suffixes[0]]])


LAYOUT = _layout_value(VALID)

CORRUPT_CASES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "too short"),
    ("truncated-4", VALID[:4], "too short"),
    ("truncated-8", VALID[:8], "exceeds the 8-byte message"),
    ("truncated-mid-header", VALID[: 8 + HEADER_LEN // 2], "exceeds the"),
    ("truncated-after-header", VALID[: 8 + HEADER_LEN], "cover 49152 data bytes .* has 0"),
    ("truncated-mid-data", VALID[: 8 + HEADER_LEN + 1000], "cover 49152 data bytes .* has 1000"),
    ("truncated-last-byte", VALID[:-1], "has 49151"),
    ("trailing-garbage", VALID + b"\0" * 8, "has 49160"),
    ("length-huge", with_length(VALID, 2**64 - 1), "exceeds 1048576"),
    ("length-over-1mib", with_length(VALID, 2**20 + 1), "exceeds 1048576"),
    ("length-past-end", with_length(VALID, len(VALID)), "exceeds the"),
    ("length-short", with_length(VALID, HEADER_LEN - 8), "not valid JSON"),
    ("flip-open-brace", flip(VALID, 8), "not valid JSON"),
    ("flip-quote", flip(VALID, 9, 0x40), "not valid JSON"),
    ("flip-shape-digit", VALID.replace(b"[48,16,16]", b"[49,16,16]"), "do not match"),
    ("flip-dtype", VALID.replace(b'"F32"', b'"F33"'), "unsupported dtype 'F33'"),
    ("flip-layout-char", VALID.replace(b'"fedsb.layout":"eNr', b'"fedsb.layout":"eNs'), "garbled"),
    ("flip-version", VALID.replace(b"fedsb-wire/1", b"fedsb-wire/2"), "unsupported format"),
    ("not-utf8", join({}, b"")[:8] + b"\xff\xfe", "not valid JSON"),
    ("header-array", join([], b""), "not a JSON object"),  # type: ignore[arg-type]
    (
        "duplicate-json-key",
        VALID.replace(b'"round":"17"', b'"round":"17","round":"1"'),
        "duplicate key",
    ),
    ("nan-literal", VALID.replace(b'"shape":[48,', b'"shape":[NaN,'), "not valid JSON"),
    ("deep-nesting", join({"x": json.loads("[" * 50 + "]" * 50)}, b""), "no __metadata__"),
    ("recursion", struct.pack("<Q", 400_000) + b"[" * 400_000, "not valid JSON"),
    ("no-metadata", rewrite(VALID, lambda h: h.pop("__metadata__")), "no __metadata__"),
    ("meta-not-str", rewrite(VALID, set_meta("round", 17)), "values must be strings"),
    (
        "no-version",
        rewrite(VALID, lambda h: h["__metadata__"].pop(wire.FORMAT_KEY)),
        "unsupported format version None",
    ),
    ("no-layout", rewrite(VALID, lambda h: h["__metadata__"].pop(wire.LAYOUT_KEY)), "missing"),
    ("unknown-reserved", rewrite(VALID, set_meta("fedsb.extra", "1")), "unknown reserved"),
    ("layout-not-base64", rewrite(VALID, set_meta(wire.LAYOUT_KEY, "@@@@")), "garbled"),
    ("layout-not-zlib", rewrite(VALID, set_meta(wire.LAYOUT_KEY, "AAAA")), "garbled"),
    ("layout-not-json", rewrite(VALID, set_meta(wire.LAYOUT_KEY, b64z(b"{"))), "layout is not"),
    (
        "layout-truncated",
        rewrite(VALID, set_meta(wire.LAYOUT_KEY, b64z(b"[]", cut=4))),
        "truncated",
    ),
    (
        "layout-trailing",
        rewrite(VALID, set_meta(wire.LAYOUT_KEY, b64z(b"[]", tail=b"x"))),
        "trailing",
    ),
    ("layout-wrong-form", rewrite(VALID, set_layout({"g0": []})), r"\[counts, prefix"),
    ("layout-zero-count", rewrite(VALID, set_layout([[0], [], []])), "positive"),
    ("layout-bad-prefix", rewrite(VALID, set_layout([[1], [-1], ["a"]])), "prefix lengths"),
    ("layout-len-mismatch", rewrite(VALID, set_layout([[48], [0], ["a"]])), "disagree"),
    ("layout-extra-group", rewrite(VALID, set_layout([[1, 1], [0, 0], ["a", "b"]])), "2 groups"),
    ("layout-absent-group", rewrite(VALID, _rename_group), "names group 'g0'"),
    ("count-vs-first-dim", rewrite(VALID, set_layout([[47], *[v[:47] for v in LAYOUT[1:]]])), "47"),
    ("prefix-too-long", rewrite(VALID, set_layout([[2], [0, 5], ["a", "b"]])), "exceeds the prev"),
    ("empty-name", rewrite(VALID, set_layout([[1], [0], [""]])), "empty tensor name"),
    ("duplicate-names", rewrite(VALID, _duplicate_names()), "duplicate tensor names"),
    (
        "huge-tensor-tiny-buffer",
        rewrite(VALID, _huge_tensor),
        "cover 3221225472 data bytes but the message has 49152",
    ),
    ("entry-list-dtype", rewrite(VALID, lambda h: h["g0"].update(dtype=["F32"])), "unsupported"),
    ("entry-extra-field", rewrite(VALID, lambda h: h["g0"].update(x=1)), "exactly"),
    ("entry-bool-shape", rewrite(VALID, lambda h: h["g0"].update(shape=[True])), "invalid shape"),
    (
        "entry-float-offset",
        rewrite(VALID, lambda h: h["g0"].update(data_offsets=[0.0, 1])),
        "invalid data_offsets",
    ),
    ("entry-reversed", rewrite(VALID, lambda h: h["g0"].update(data_offsets=[9, 0])), "reversed"),
    ("entry-ndim", rewrite(VALID, lambda h: h["g0"].update(shape=[1] * 40)), "invalid shape"),
    ("nan", encode_update(_nan_state()), "'bert.encoder.layer.5.attention.self.key.R' holds NaN"),
    ("inf", encode_update(_inf_state()), "layer.0.attention.output.dense.R' holds NaN or Inf"),
    ("wrong-dtype", encode_update({"a": torch.zeros(2, dtype=torch.float64)}), "float64; allowed"),
]


@pytest.mark.parametrize(
    ("message", "match"), [c[1:] for c in CORRUPT_CASES], ids=[c[0] for c in CORRUPT_CASES]
)
def test_decode_rejects_corrupt_input(message: bytes, match: str) -> None:
    """Every malformed message raises WireFormatError with a message naming the problem."""
    with pytest.raises(WireFormatError, match=match):
        decode_update(message)


def test_prefix_bomb_is_bounded() -> None:
    """Names that grow by reusing the whole previous name cannot blow up memory."""
    count = 5000
    prefixes = [1000 * i for i in range(count)]
    bomb = rewrite(VALID, set_layout([[count], prefixes, ["x" * 1000] * count]))
    with pytest.raises(WireFormatError, match="exceed 4194304 chars"):
        decode_update(bomb)


def test_zlib_bomb_is_bounded() -> None:
    """A layout that inflates past the cap is refused without inflating it all."""
    packed = base64.b64encode(zlib.compress(b" " * (64 * 2**20), 9)).decode()
    with pytest.raises(WireFormatError, match="oversized"):
        decode_update(rewrite(VALID, set_meta(wire.LAYOUT_KEY, packed)))


def test_oversized_message_rejected_before_parsing() -> None:
    """max_bytes is checked on the length alone."""
    with pytest.raises(WireFormatError, match=f"{len(VALID)} bytes; max_bytes is 1000"):
        decode_update(VALID, max_bytes=1000)
    assert DEFAULT_MAX_BYTES == 64 * 2**20


def test_non_bytes_rejected() -> None:
    """A str or None is not a message."""
    with pytest.raises(WireFormatError, match="must be bytes, got str"):
        decode_update("hello")  # type: ignore[arg-type]


def test_nonfinite_allowed_on_request() -> None:
    """allow_nonfinite=True lets NaN through bit-exactly."""
    state = _nan_state()
    got, _ = decode_update(encode_update(state), allow_nonfinite=True)
    bits = {k: v.view(torch.int32) for k, v in got.items()}
    assert_same_state(bits, {k: v.view(torch.int32) for k, v in state.items()})
    assert bool(got["bert.encoder.layer.5.attention.self.key.R"][3, 4].isnan())


def test_int64_is_never_checked_for_nan() -> None:
    """Integer tensors pass the finite check trivially."""
    state = {"steps": torch.tensor([1, 2])}
    assert torch.equal(
        decode_update(encode_update(state), dtypes=(torch.int64,))[0]["steps"], state["steps"]
    )


def test_dtype_allow_list() -> None:
    """A dtype outside `dtypes` is refused; listing it accepts the message."""
    message = encode_update(mixed_update())
    with pytest.raises(WireFormatError, match="torch.float64; allowed: torch.float32"):
        decode_update(message)
    assert len(decode_update(message, dtypes=ALL_DTYPES)[0]) == 8


def test_expected_shapes() -> None:
    """Unknown names and wrong shapes are refused; names absent from the message are fine."""
    state = bert_base_update()
    expected = {name: (16, 16) for name in state} | {"classifier.weight": (2, 768)}
    assert_same_state(decode_update(VALID, expected_shapes=expected)[0], state)
    wrong = dict(expected, **{"bert.encoder.layer.3.attention.self.value.R": (8, 8)})
    with pytest.raises(
        WireFormatError, match=r"shape mismatch for 'bert.encoder.layer.3.*\[16, 16\]"
    ):
        decode_update(VALID, expected_shapes=wrong)
    missing = {k: v for k, v in expected.items() if "layer.11" not in k}
    with pytest.raises(WireFormatError, match="unexpected tensor name 'bert.encoder.layer.11"):
        decode_update(VALID, expected_shapes=missing)


def test_safetensors_errors_are_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure inside safetensors surfaces as WireFormatError with the cause chained."""
    cause = RuntimeError("boom")

    def failing_load(data: bytes) -> dict[str, torch.Tensor]:
        raise cause

    monkeypatch.setattr(wire.safetensors.torch, "load", failing_load)
    with pytest.raises(
        WireFormatError, match="safetensors could not parse the message: boom"
    ) as info:
        decode_update(VALID)
    assert info.value.__cause__ is cause


# ---------------------------------------------------------------- fuzzing


def decode_or_reject(message: bytes) -> bool:
    """True if `message` decodes, False if it raises WireFormatError; anything else propagates."""
    try:
        decode_update(message, dtypes=ALL_DTYPES)
    except WireFormatError:
        return False
    return True


def test_random_payloads_only_raise_wire_format_error() -> None:
    """2,000 random payloads of assorted lengths, some with a plausible header length."""
    rng = random.Random(1234)
    outcomes = []
    for i in range(2000):
        length = rng.choice((0, 1, 7, 8, 9, 16, 64, 255, 1024, 4096))
        payload = bytearray(rng.randbytes(length))
        if i % 2 and length >= 8:
            payload[:8] = struct.pack("<Q", rng.randrange(0, length - 7))
        outcomes.append(decode_or_reject(bytes(payload)))
    assert not any(outcomes)


def test_single_byte_mutations_only_raise_wire_format_error() -> None:
    """2,000 random single-byte mutations of a small mixed message: decode or WireFormatError."""
    rng = random.Random(99)
    message = encode_update(mixed_update(), {"round": "1", "client": "c"})
    outcomes = []
    for _ in range(2000):
        mutated = bytearray(message)
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        outcomes.append(decode_or_reject(bytes(mutated)))
    assert any(outcomes) and not all(outcomes)

"""charstream-state v1: what it holds comes back bit for bit, and every way a blob can be wrong is
refused with a message saying which."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from exports import state as portable

VOCAB = ("\n", " ", "a", "b")
KEY = b"0123456789abcdef0123"


def a_state(**changes: object) -> portable.State:
    rng = np.random.default_rng(5)
    values: dict[str, object] = {
        "model": "m",
        "weights_sha256": "a" * 64,
        "vocab_sha256": portable.vocab_sha256(VOCAB),
        "cell": "lstm",
        "tensors": [rng.standard_normal((2, 8)).astype(np.float32) for _ in range(2)],
        "logits": rng.standard_normal(4).astype(np.float32),
        "position": 42,
        "last_char": "a",
        "rng": dict(np.random.PCG64(3).state),
        "metadata": {"turn": 3},
    }
    values.update(changes)
    return portable.State(**values)  # type: ignore[arg-type]


def test_a_state_round_trips_bit_for_bit_through_bytes_and_base64url() -> None:
    state = a_state()
    blob = portable.encode(state)
    text = portable.encode_text(blob)
    assert "=" not in text and "+" not in text and "/" not in text
    back = portable.decode(portable.decode_text(text))
    assert all(np.array_equal(a, b) for a, b in zip(back.tensors, state.tensors, strict=True))
    assert back.logits is not None and np.array_equal(back.logits, state.logits)
    assert (back.position, back.last_char, back.rng, back.metadata) == (42, "a", state.rng, {"turn": 3})
    portable.check_fits(back, "m", "a" * 64, VOCAB, "lstm", 2, 8)
    before_input = portable.decode(portable.encode(a_state(logits=None, last_char=None, position=0)))
    assert before_input.logits is None and before_input.last_char is None


@pytest.mark.parametrize(
    ("blob", "says"),
    [
        (b"CS", "at least"),
        (b"XXXX" + portable.encode(a_state())[4:], "not a charstream-state"),
        (portable.encode(a_state())[:-3], "truncated"),
        (portable.encode(a_state()) + b"\0", "over-long"),
        (portable.encode(a_state(tensors=[np.full((2, 8), np.nan, np.float32)] * 2)), "not finite"),
        (portable.encode(a_state(logits=np.array([0, np.inf, 0, 0], np.float32))), "not finite"),
    ],
)
def test_a_broken_blob_is_refused_saying_why(blob: bytes, says: str) -> None:
    with pytest.raises(portable.StateError, match=says):
        portable.decode(blob)


def test_another_version_and_a_bad_header_are_refused() -> None:
    blob = portable.encode(a_state())
    with pytest.raises(portable.StateError, match="version 7"):
        portable.decode(blob[:4] + (7).to_bytes(2, "little") + blob[6:])
    head = json.dumps({"format": "charstream-state", "layers": "2"}).encode()
    with pytest.raises(portable.StateError, match="no valid"):
        portable.decode(struct.pack("<4sHI", b"CSST", 1, len(head)) + head)
    with pytest.raises(portable.StateError, match="base64url"):
        portable.decode_text("not base64!")


def test_a_state_of_another_model_or_shape_does_not_fit() -> None:
    state = portable.decode(portable.encode(a_state()))
    for args, says in (
        (("other", "a" * 64, VOCAB, "lstm", 2, 8), "belongs to model 'm'"),
        (("m", "b" * 64, VOCAB, "lstm", 2, 8), "other weights"),
        (("m", "a" * 64, (*VOCAB, "c"), "lstm", 2, 8), "another vocabulary"),
        (("m", "a" * 64, VOCAB, "gru", 2, 8), "this model is a gru of 1 x 2 x 8"),
        (("m", "a" * 64, VOCAB, "lstm", 2, 16), "lstm of 2 x 2 x 16"),
    ):
        with pytest.raises(portable.StateError, match=says):
            portable.check_fits(state, *args)  # type: ignore[arg-type]


def test_a_signed_state_is_checked_under_the_key() -> None:
    signed = portable.encode(a_state(), KEY)
    assert portable.decode(signed, KEY).position == 42
    assert portable.decode(signed).position == 42  # a reader without the key only validates
    tampered = bytearray(signed)
    tampered[-40] ^= 1  # a byte of the logits
    with pytest.raises(portable.StateError, match="signature does not match"):
        portable.decode(bytes(tampered), KEY)
    with pytest.raises(portable.StateError, match="signature does not match"):
        portable.decode(signed, b"another key, 16 bytes or more")
    with pytest.raises(portable.StateError, match="unsigned"):
        portable.decode(portable.encode(a_state()), KEY)


def test_metadata_is_bounded() -> None:
    with pytest.raises(portable.StateError, match="metadata"):
        portable.encode(a_state(metadata={"x": "y" * 5000}))

from __future__ import annotations

from sparseft.serve.text import TextTail


class Letters:
    """Token i decodes to the i-th piece; token 0 is half of a two-byte character until token 1 completes it."""

    pieces = ["\ufffd", "é", "a", "b", "S", "T", "O", "P", " "]

    def decode(self, ids: list[int], **options: object) -> str:
        text = "".join(self.pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")


def feed(tail: TextTail, tokens: list[int]) -> list[tuple[str, bool]]:
    return [tail.add(t) for t in tokens]


def test_pieces_join_to_the_text() -> None:
    tail = TextTail(Letters())
    sent = feed(tail, [2, 3, 8, 2])
    assert "".join(text for text, _ in sent) == "ab a"
    assert not any(stopped for _, stopped in sent)


def test_an_incomplete_character_waits_for_its_second_half() -> None:
    tail = TextTail(Letters())
    assert tail.add(2) == ("a", False)
    assert tail.add(0) == ("", False)  # half a character: nothing yet
    assert tail.add(1) == ("é", False)


def test_a_possible_stop_string_is_held_back_then_sent_when_it_is_not_one() -> None:
    tail = TextTail(Letters(), ["STOP"])
    assert feed(tail, [2, 4, 5]) == [("a", False), ("", False), ("", False)]
    assert tail.add(3) == ("STb", False)  # "STb" cannot begin "STOP" any more


def test_a_stop_string_ends_the_text_before_it() -> None:
    tail = TextTail(Letters(), ["STOP", "bb"])
    sent = feed(tail, [2, 4, 5, 6, 7])
    assert "".join(text for text, _ in sent) == "a"
    assert sent[-1][1] is True


def test_the_end_sends_what_was_held_back() -> None:
    tail = TextTail(Letters(), ["STOP"])
    feed(tail, [2, 4, 5])
    assert tail.rest() == "ST"
    tail = TextTail(Letters(), ["STOP"])
    feed(tail, [2, 4])
    assert tail.add(None) == ("S", False)  # an end token: no stop string came

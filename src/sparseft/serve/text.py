"""A request's new text as its tokens come: what can be sent now, and where a stop string ends it.

The text is decoded again from all new tokens each time (a token alone may decode to half a character, and
tokenizers join pieces by context), and only the part past what was sent goes out. Held back: a trailing
incomplete character, and any tail that could be the start of a stop string, so no client ever sees part of a
stop string (OpenAI's rule: the stop string is not part of the text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextTail:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text sent so far

    def _text(self) -> str:
        return str(
            self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    def add(self, token: int | None) -> tuple[str, bool]:
        """Take the next token (None: the text ended on an end token). Returns the text to send now and whether a
        stop string ended the text (the text before it is all that is sent)."""
        if token is not None:
            self.ids.append(token)
        text = self._text()
        hits = [i for i in (text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            return self._send(text, min(hits)), True
        if token is None:
            return self._send(text, len(text)), False
        end = len(text.rstrip("\ufffd"))
        hold = 0  # the longest tail that begins a stop string
        for stop in self.stop:
            for k in range(min(len(stop) - 1, end - self.sent), hold, -1):
                if text.endswith(stop[:k], 0, end):
                    hold = k
                    break
        end -= hold
        return self._send(text, max(end, self.sent)), False

    def rest(self) -> str:
        """Whatever is held back, sent now that the text ends here."""
        text = self._text()
        return self._send(text, len(text))

    def _send(self, text: str, end: int) -> str:
        out = text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

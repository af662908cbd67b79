"""Incremental detokenisation with stop strings.

Decodes a sliding window of ids (as TGI/vLLM do) so each token costs O(1), holds back an
incomplete UTF-8 character, and holds back text that may be the start of a stop string,
so the agent never receives text that a stop string later removes.  Until a request's
``min_tokens`` are generated its stop strings are off: text up to ``stop_floor`` can no
longer hold the start of one.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of ``text`` already handed out
        self._prefix = 0
        self._read = 0
        self.stopped = False
        self.stop_floor = 0  # stop strings must start at or after this character

    def push(self, token_id: int, stops: bool = True) -> tuple[str, bool]:
        """Add one token; return (text now safe to emit, whether a stop string ended it).

        ``stops=False`` (still under ``min_tokens``): no stop string may end the text here.
        """
        self.ids.append(token_id)
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self.ids))
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        if not stops:
            self.stop_floor = len(self.text)
        elif self.stop:
            cut = self._find_stop()
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held()), False

    def flush(self) -> str:
        """At the end: whatever was held back is final text."""
        return self._take(len(self.text))

    def _decode(self, a: int, b: int) -> str:
        return self.tok.decode(self.ids[a:b], skip_special_tokens=True) if b > a else ""

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out, self.emitted = self.text[self.emitted : upto], upto
        return out

    def _find_stop(self) -> int | None:
        start = max(self.stop_floor, self.emitted - max(len(s) for s in self.stop))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text) - self.stop_floor), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

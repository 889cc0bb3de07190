"""A Python transcription of llama.cpp's SPM tokenizer (pinned tree, src/llama-vocab.cpp).

Used to check, without the compiled library, that a converted vocabulary makes
llama.cpp tokenize like the reference transformers tokenizer. It follows
``llama_vocab::impl::tokenize`` for LLAMA_VOCAB_TYPE_SPM: special-token
partitioning (``tokenizer_st_partition``: CONTROL/UNKNOWN tokens only when
``parse_special``, USER_DEFINED always; longest text first), optional leading
space, spaces -> U+2581, then ``llm_tokenizer_spm_session``: UTF-8 characters,
greedy bigram merges by token score (ties: leftmost), byte fallback.
"""

from __future__ import annotations

import heapq

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _utf8_len(first: int) -> int:
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[first >> 4]


class LlamaSpm:
    def __init__(self, tokens: list[bytes], scores: list[float], types: list[int], *,
                 add_space_prefix: bool, add_bos: bool = False, bos_id: int = 1):
        self.tokens, self.scores, self.types = tokens, scores, types
        self.token_to_id = {t: i for i, t in enumerate(tokens)}  # later ids win, as in the C++ map assignment
        self.add_space_prefix, self.add_bos, self.bos_id = add_space_prefix, add_bos, bos_id
        special = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        self.special = sorted(special, key=lambda i: -len(tokens[i]))

    # -- special-token partition ----------------------------------------------------------------
    def _partition(self, text: bytes, parse_special: bool) -> list[bytes | int]:
        frags: list[bytes | int] = [text]
        for sid in self.special:
            if not parse_special and self.types[sid] in (CONTROL, UNKNOWN):
                continue
            st = self.tokens[sid]
            out: list[bytes | int] = []
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    continue
                while True:
                    k = f.find(st)
                    if k < 0:
                        if f:
                            out.append(f)
                        break
                    if k > 0:
                        out.append(f[:k])
                    out.append(sid)
                    f = f[k + len(st):]
            frags = out
        return frags

    # -- llm_tokenizer_spm_session --------------------------------------------------------------
    def _byte_token(self, b: int) -> int:
        t = self.token_to_id.get(f"<0x{b:02X}>".encode())
        return t if t is not None else self.token_to_id[bytes([b])]

    def _spm(self, text: bytes, out: list[int]) -> None:
        # symbols: [start, n, prev, next]
        syms = []
        offs = 0
        while offs < len(text):
            n = min(_utf8_len(text[offs]), len(text) - offs)
            syms.append([offs, n, len(syms) - 1, -1])
            offs += n
        for i in range(len(syms) - 1):
            syms[i][3] = i + 1
        heap: list[tuple[float, int, int, int]] = []
        rev_merge: dict[bytes, tuple[int, int]] = {}

        def try_add(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            s = text[syms[left][0] : syms[left][0] + syms[left][1] + syms[right][1]]
            tid = self.token_to_id.get(s)
            if tid is None:
                return
            heapq.heappush(heap, (-self.scores[tid], left, right, len(s)))
            rev_merge[s] = (left, right)

        for i in range(1, len(syms)):
            try_add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            ls, rs = syms[left], syms[right]
            if ls[1] == 0 or rs[1] == 0 or ls[1] + rs[1] != size:
                continue
            ls[1] += rs[1]
            rs[1] = 0
            ls[3] = rs[3]
            if rs[3] >= 0:
                syms[rs[3]][2] = left
            try_add(ls[2], left)
            try_add(left, ls[3])

        def resegment(i: int) -> None:
            s = text[syms[i][0] : syms[i][0] + syms[i][1]]
            tid = self.token_to_id.get(s)
            if tid is not None:
                out.append(tid)
                return
            p = rev_merge.get(s)
            if p is None:
                out.extend(self._byte_token(b) for b in s)
                return
            resegment(p[0])
            resegment(p[1])

        i = 0 if syms else -1
        while i != -1:
            resegment(i)
            i = syms[i][3]

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        out: list[int] = []
        prev_special = True
        if add_special and self.add_bos:
            out.append(self.bos_id)
        for frag in self._partition(text.encode("utf-8"), parse_special) if text else []:
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            raw = (b" " if self.add_space_prefix and prev_special else b"") + frag
            self._spm(raw.replace(b" ", "\u2581".encode()), out)
            prev_special = False
        return out

    @classmethod
    def from_gguf(cls, path) -> "LlamaSpm":
        import gguf

        r = gguf.GGUFReader(path)
        f = r.fields
        tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]) for i in f["tokenizer.ggml.tokens"].data]
        scores = [float(x) for x in f["tokenizer.ggml.scores"].contents()]
        types = [int(x) for x in f["tokenizer.ggml.token_type"].contents()]
        asp = f["tokenizer.ggml.add_space_prefix"].contents() if "tokenizer.ggml.add_space_prefix" in f else True
        add_bos = f["tokenizer.ggml.add_bos_token"].contents() if "tokenizer.ggml.add_bos_token" in f else True
        bos = f["tokenizer.ggml.bos_token_id"].contents() if "tokenizer.ggml.bos_token_id" in f else 1
        return cls(tokens, scores, types, add_space_prefix=bool(asp), add_bos=bool(add_bos), bos_id=int(bos))

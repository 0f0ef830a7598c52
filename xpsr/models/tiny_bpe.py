"""A deterministic byte-pair-encoding learner for the offline tiny tokenizers (CLIP and LLaVA test models).

Why not ``tokenizers.trainers.BpeTrainer``: it orders its initial alphabet and breaks ties between equally
frequent pairs in Rust hash-map order, which is seeded per process (``PYTHONHASHSEED`` has no effect), so
the same corpus gave different token ids in different processes (e.g. 'a' -> 32, 42 or 38), hence
different prompt embeddings and different weights and pixels from the same seed. Here every choice is
made on explicit sort keys: the alphabet in the fixed GPT-2/CLIP byte order, the most frequent pair
first and, among equally frequent pairs, the lexicographically smallest one.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


def byte_table() -> dict[int, str]:
    """byte -> its printable stand-in in byte-level BPE (GPT-2, CLIP): printable bytes stand for
    themselves; the others, in byte order, take the characters from U+0100 on. Insertion order is the
    order GPT-2 and CLIP list their base vocabulary in: the printable bytes first."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


def byte_alphabet() -> list[str]:
    """The 256 base symbols of a byte-level BPE vocabulary, in GPT-2/CLIP order."""
    return list(byte_table().values())


def byte_encode(text: str) -> str:
    """``text`` as byte-level BPE symbols: each UTF-8 byte replaced by its printable stand-in."""
    table = byte_table()
    return "".join(table[b] for b in text.encode("utf-8"))


def learn_merges(words: Iterable[str], num_merges: int, end_of_word: str = "",
                 min_frequency: int = 2) -> list[tuple[str, str]]:
    """BPE merges learnt from ``words`` (already in byte-level symbols), at most ``num_merges`` of them.

    Each word starts as its characters, the last one carrying ``end_of_word`` (CLIP's ``</w>``). Every round
    merges the most frequent adjacent pair (ties: the smallest pair in string order) until none occurs
    ``min_frequency`` times. The result depends only on the multiset of words.
    """
    counts = Counter(words)
    # sorted so that even the order of the working list does not depend on how ``words`` was produced
    pieces = [(_split(w, end_of_word), n) for w, n in sorted(counts.items()) if w]
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for symbols, n in pieces:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best, freq = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if freq < min_frequency:
            break
        merges.append(best)
        pieces = [(_merge(symbols, best), n) for symbols, n in pieces]
    return merges


def _split(word: str, end_of_word: str) -> tuple[str, ...]:
    return (*word[:-1], word[-1] + end_of_word)


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_vocab(head: list[str], merges: list[tuple[str, str]], tail: list[str] = ()) -> dict[str, int]:
    """token -> id: ``head`` (alphabet, specials), then each merge's result, then ``tail``, ids in that
    order; a token already present keeps its first id (two merges can spell the same string)."""
    vocab: dict[str, int] = {}
    for token in [*head, *("".join(m) for m in merges), *tail]:
        vocab.setdefault(token, len(vocab))
    return vocab

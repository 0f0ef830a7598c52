"""The offline tiny tokenizers: a deterministic BPE, the same token ids in every process."""
import json
import os
import subprocess
import sys

from conftest import REPO

from xpsr.models.tiny_bpe import build_vocab, byte_alphabet, byte_encode, learn_merges


def test_bpe_merges_by_hand():
    # (a, b) occurs 3 times, (b, c) once: one merge at min_frequency 2, then (ab, c) at 1
    assert learn_merges(["ab", "ab", "abc"], 10) == [("a", "b")]
    assert learn_merges(["ab", "ab", "abc"], 10, min_frequency=1) == [("a", "b"), ("ab", "c")]
    # equal counts: the smaller pair first, whatever the input order
    assert learn_merges(["xy", "ab"], 10, min_frequency=1) == [("a", "b"), ("x", "y")]
    assert learn_merges(["ab", "xy"], 10, min_frequency=1) == [("a", "b"), ("x", "y")]
    # the end-of-word marker rides on the last symbol; the merge limit holds
    assert learn_merges(["abab"], 1, end_of_word="</w>", min_frequency=1) == [("a", "b")]
    assert learn_merges(["ab"], 5, end_of_word="</w>", min_frequency=1) == [("a", "b</w>")]
    assert build_vocab(["a", "b"], [("a", "b"), ("a", "b")], ["<s>"]) == {"a": 0, "b": 1, "ab": 2, "<s>": 3}


def test_byte_alphabet_is_gpt2_clip_order():
    alphabet = byte_alphabet()
    assert len(alphabet) == len(set(alphabet)) == 256
    assert alphabet[:3] == ["!", '"', "#"] and alphabet[93] == "~" and alphabet[188] == chr(256)  # byte 0
    assert byte_encode(" a\n") == "\u0120a\u010a"  # space -> 'Ġ', newline -> 'Ċ' as in GPT-2/CLIP vocabularies


def test_tiny_clip_tokenizer_layout_and_words():
    from xpsr.models.tiny import _WORDS, build_tiny_tokenizer, tiny_clip_vocab

    vocab, _ = tiny_clip_vocab()
    tok = build_tiny_tokenizer()
    assert vocab["a</w>"] == 256 + ord("a") - ord("!")  # CLIP's layout: bytes, bytes + </w>, merges, specials
    assert tok.bos_token_id == len(vocab) - 2 and tok.eos_token_id == len(vocab) - 1 == tok.pad_token_id
    for word in set(_WORDS):
        assert tok(word, add_special_tokens=False).input_ids == [vocab[word + "</w>"]], word
    ids = tok("a 2x blurry photo, é!").input_ids  # digits, punctuation and accents are bytes, not <unk>
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "a2xblurryphoto,é!"


_PROBE = """
import json
from xpsr.captions.tiny_llava import _byte_level_bpe
from xpsr.models.tiny import build_tiny_tokenizer, tiny_clip_vocab
vocab, merges = tiny_clip_vocab()
llava = _byte_level_bpe()
print(json.dumps({"vocab": vocab, "merges": merges, "llava": llava.to_str(),
                  "ids": build_tiny_tokenizer()("a blurry photo of a cat").input_ids}))
"""


def test_the_same_ids_in_every_process():
    """tokenizers' BpeTrainer gave 'a' a different id in each process; ours must not, whatever the hash seed."""
    outs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(json.loads(proc.stdout.splitlines()[-1]))
    assert outs[0] == outs[1]

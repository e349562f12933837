"""What streaming a request's text costs per token: the window decoder (two Python-side decodes of ids windows per
token, the engine's detokenizer before DecodeStream, kept for tokenizers without a usable fast backend) against
DecodeStream, on the same output.

The output is the first `--tokens` tokens of a mixed English / code / multi-byte text encoded by the tokenizer (by
default the embedded SmolLM2's, read from its GGUF), decoded token by token after a short prompt. Both decoders
must give the same text; the measure is microseconds per token, best of `--repeats`.

    python -m benchmarks.detokenize_cost [--tokenizer FOLDER] [--tokens 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from zipserve.workers.output_processor import OutputProcessor, StreamDetokenizer, WindowDetokenizer
from zipserve.workers.sampling_params import SamplingParams
from zipserve.workers.sequence import Sequence
from zipserve.workers.tokenizer import fast_backend, text_decoder

_PARAGRAPH = (
    "The engine streams each request's text as its tokens arrive; a character split across tokens is held back "
    "until the token that completes it. def step(self):\n    return [seq for seq in self.running if seq.ok]\n"
    "Multi-byte text: café, naïve, Größe, 日本語のテキスト, 中文字符, привет мир, emoji 🎉🚀✓, math ∑∫√π. "
)


def load(folder: str | None):
    from transformers import AutoTokenizer

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    from zipserve.cluster.default_model import find_default_gguf

    gguf = find_default_gguf()
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


def run(make, prompt: list[int], output: list[int]) -> tuple[float, str]:
    """Seconds to stream `output` after `prompt` through a fresh detokenizer, and the text."""
    detok = make()
    ids = list(prompt)
    start = time.perf_counter()
    for token in output:
        ids.append(token)
        detok.step(ids)
    detok.flush(ids)
    return time.perf_counter() - start, detok.text


def run_processor(proc: OutputProcessor, prompt: list[int], output: list[int]) -> tuple[float, str]:
    """The same through the engine's calls: new text, then the output, per token."""
    seq = Sequence("r", list(prompt), len(prompt), SamplingParams(max_tokens=len(output)), 0)
    proc.add_request(seq)
    start = time.perf_counter()
    for token in output:
        seq.token_ids.append(token)
        out = proc.output(seq, [token], proc.new_text(seq))
    return time.perf_counter() - start, out.text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", help="a tokenizer folder (default: the embedded SmolLM2's)")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    tok = load(a.tokenizer)
    backend, decode = fast_backend(tok), text_decoder(tok)
    if backend is None:
        raise SystemExit("this tokenizer has no fast backend usable by DecodeStream")
    ids = []
    while len(ids) < a.tokens + 16:
        ids += tok.encode(_PARAGRAPH, add_special_tokens=False)
    prompt, output = ids[:16], ids[16 : 16 + a.tokens]
    decoders = {
        "window (before)": lambda: WindowDetokenizer(decode, len(prompt)),
        "DecodeStream": lambda: StreamDetokenizer(backend, decode, prompt, len(prompt)),
    }
    texts, rows = set(), []
    for name, make in decoders.items():
        times = []
        for _ in range(a.repeats):
            seconds, text = run(make, prompt, output)
            times.append(seconds)
            texts.add(text)
        rows.append((name, times))
    times = []
    for _ in range(a.repeats):
        seconds, text = run_processor(OutputProcessor(tok), prompt, output)
        times.append(seconds)
        texts.add(text)
    rows.append(("OutputProcessor (DecodeStream + output)", times))
    if len(texts) != 1 or texts.pop() != tok.decode(output, skip_special_tokens=True):
        raise SystemExit("the decoders' texts differ")
    print(f"{len(output)} output tokens, {len(tok)}-token vocabulary; microseconds per token")
    for name, times in rows:
        per = [t / len(output) * 1e6 for t in times]
        print(f"  {name:42s} best {min(per):7.2f}   median {statistics.median(per):7.2f}")


if __name__ == "__main__":
    main()

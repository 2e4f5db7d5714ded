"""Would n-gram (prompt-lookup) drafts speed up the bundled SmolLM2 on this bench's prompts?

vLLM's ``ngram`` speculative method proposes the tokens that followed the latest earlier
occurrence of the sequence's last n tokens (prompt and output), and one step verifies
them: at temperature 0 the answer is unchanged, and each step yields the drafted tokens the
model agrees with plus one. This probe decodes ``bench.batch_bench``'s eight prompts
greedily with the real model (``auto`` weights, one thread) and replays that proposer over
each answer: how many drafted tokens would have been accepted, and how many tokens a step
would have yielded. Nothing in the engine changes; run it to decide whether building the
path is worth it. Writes ``bench/results/<stamp>-ngram-draft-probe.md``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import AutoTokenizer

from bench.batch_bench import TOPICS
from deployments.engines.gguf_cache import resolve_model_dir
from deployments.engines.ragged import RaggedModel
from deployments.engines.weights import load_causal_lm
from serve_app.settings import TransformersEngineConfig

RESULTS = Path(__file__).parent / "results"


def propose(ids: list[int], k: int, longest: int, shortest: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens
    of ``ids``, trying n from ``longest`` down to ``shortest``; [] when none recurs."""
    for n in range(longest, shortest - 1, -1):
        if len(ids) <= n:
            continue
        tail = ids[-n:]
        for s in range(len(ids) - n - 1, -1, -1):
            if ids[s:s + n] == tail:
                return ids[s + n:s + n + k]
    return []


def replay(prompt: list[int], answer: list[int], k: int, longest: int, shortest: int) -> tuple[int, int, int]:
    """(verify steps, drafted tokens, accepted tokens) to produce ``answer`` with drafts."""
    made = steps = drafted = accepted = 0
    while made < len(answer):
        draft = propose(prompt + answer[:made], k, longest, shortest)
        agree = 0
        for j, token in enumerate(draft):
            if made + j < len(answer) and answer[made + j] == token:
                agree += 1
            else:
                break
        steps += 1
        drafted += len(draft)
        accepted += agree
        made += agree + 1
    return steps, drafted, accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--draft", type=int, default=3, help="tokens drafted per step (k)")
    parser.add_argument("--ngram", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = resolve_model_dir(TransformersEngineConfig())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stepper = RaggedModel(load_causal_lm(folder, "auto"))
    rows, totals = [], [0, 0, 0, 0]
    for i, topic in enumerate(TOPICS):
        text = f"Write a long story about {topic} (request 000000-{i})."  # batch_bench's shape
        prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                    add_generation_prompt=True, tokenize=True)["input_ids"])
        kv = stepper.new_kv()
        answer = [int(stepper.prefill(kv, prompt).argmax())]
        while len(answer) < args.max_tokens:
            answer.append(int(stepper.decode([kv], [answer[-1]])[0].argmax()))
        steps, drafted, accepted = replay(prompt, answer, args.draft, args.ngram[1], args.ngram[0])
        rows.append(f"| {topic} | {len(answer)} | {steps} | {drafted} | {accepted} | {len(answer) / steps:.2f} |")
        for j, v in enumerate((len(answer), steps, drafted, accepted)):
            totals[j] += v
    tokens, steps, drafted, accepted = totals
    lines = [f"# n-gram draft probe (SmolLM2-135M auto weights, greedy, max_tokens {args.max_tokens}, "
             f"k={args.draft}, n={args.ngram[0]}-{args.ngram[1]})", "",
             "| prompt | tokens | verify steps | drafted | accepted | tokens/step |", "|---|---:|---:|---:|---:|---:|",
             *rows, f"| all | {tokens} | {steps} | {drafted} | {accepted} | {tokens / steps:.2f} |"]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"{stamp}-ngram-draft-probe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Greedy decoding that drops finished rows gives model.generate's answers exactly."""

from __future__ import annotations

import pytest
import torch

from spf.generation import _greedy_hf, _greedy_pruned, eos_ids, generate
from spf.models import tiny_llama


@pytest.fixture(scope="module")
def lively():
    """The tiny random model with weights wide enough that its greedy answers vary by prompt."""
    torch.manual_seed(0)
    model, tok = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.eval()
    convs = [[{"role": "user", "content": "hello world " * (i % 7 + 1) + str(i)}] for i in range(12)]
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return model, tok, convs, enc


def _cut(rows: list[torch.Tensor], stops: list[int]) -> list[list[int]]:
    out = []
    for row in rows:
        kept = []
        for t in row.tolist():
            kept.append(t)
            if t in stops:
                break
        out.append(kept)
    return out


def test_pruned_greedy_equals_generate_when_rows_stop_at_different_steps(lively):
    model, tok, _, enc = lively
    stop = eos_ids(model, tok)
    with torch.inference_mode():
        free = _greedy_hf(model, enc["input_ids"], enc["attention_mask"], 20, stop)
        # stop tokens the answers do emit, so rows end at many different steps (and some never)
        emitted = sorted({t for row in free for t in row.tolist()})[:8]
        lengths = set()
        for extra in emitted:
            stops = [*stop, extra]
            want = _cut(_greedy_hf(model, enc["input_ids"], enc["attention_mask"], 20, stops), stops)
            got = _greedy_pruned(model, enc["input_ids"], enc["attention_mask"], 20, stops)
            assert got == want, extra
            lengths |= {len(t) for t in got}
    assert len(lengths) >= 4  # the rows really did stop at different steps


def test_generate_default_and_reference_paths_agree(lively):
    model, tok, convs, _ = lively
    fast = generate(model, tok, convs, max_new_tokens=12, batch_size=5)
    ref = generate(model, tok, convs, max_new_tokens=12, batch_size=5, prune_finished=False)
    assert fast == ref and any(fast)
    prefill = ["Sure"] * len(convs)
    assert generate(model, tok, convs, max_new_tokens=6, batch_size=4, prefill=prefill) == generate(
        model, tok, convs, max_new_tokens=6, batch_size=4, prefill=prefill, prune_finished=False
    )

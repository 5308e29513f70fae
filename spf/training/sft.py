"""TRL's ``SFTTrainer`` with SPF — the idiomatic ``SFTTrainer(peft_config=…)`` path (the ``trl`` extra).

``SFTTrainer`` wraps the model with peft inside its ``__init__``, after a user could have built an optimizer
for it; :class:`SPFSFTTrainer` instead wraps the optimizer the trainer builds over that peft model
(:class:`~spf.training.hf.SPFTrainerMixin`). One difference from ``spf train`` to know: TRL truncates a
sequence longer than ``SFTConfig.max_length`` by keeping its start, so a long prompt can lose the whole
response (the row then trains on nothing); ``spf train`` drops prompt tokens from the left and keeps the
response. Set ``max_length`` to cover your longest prompt + response.
"""

from __future__ import annotations

from typing import Any

from spf.data.samples import ChatSample
from spf.training.hf import SPFTrainerMixin

try:
    from trl import SFTTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("spf.training.sft needs TRL: pip install 'spf[trl]'") from err

__all__ = ["SPFSFTTrainer", "to_sft_rows"]


class SPFSFTTrainer(SPFTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with SPF: ``SPFSFTTrainer(model, args=SFTConfig(…), train_dataset=…,
    processing_class=tok, peft_config=LoraConfig(…), spf_sample=sample, spf_rank=8)``."""


def to_sft_rows(samples: list[ChatSample]) -> list[dict[str, Any]]:
    """Our samples as TRL's conversational prompt-completion rows (the loss covers the completion only);
    ``datasets.Dataset.from_list(to_sft_rows(samples))`` is a ``train_dataset``."""
    rows = []
    for i, s in enumerate(samples):
        where = f"sample {i}" + (f" ({s.source})" if s.source else "")
        if not s.response:
            raise ValueError(f"{where}: no response to train on")
        if s.prefill:  # TRL would train on the prefill too; only spf train masks it
            raise ValueError(f"{where}: has a prefill, which SFTTrainer cannot mask; train it with spf train")
        prompt = s.prompt_messages()
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": s.response}]})
    return rows

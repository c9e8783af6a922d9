"""CLIP text tokenisation for the diffusion text encoder, with the token positions of class names.

The BPE vocabulary is the real one that ships inside open_clip, so ordinary prompts tokenise
exactly as Stable Diffusion's own tokenizer would, without downloading anything.
"""

from __future__ import annotations

import functools

import torch

# Stable Diffusion folders (the transformers tokenizer) and open_clip name the two special
# tokens differently; the ids are the same.
_SPECIAL_NAMES = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}
_HF_NAMES = {v: k for k, v in _SPECIAL_NAMES.items()}


@functools.lru_cache(maxsize=4)
def _simple_tokenizer(bpe_path: str | None):
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    return SimpleTokenizer(bpe_path or default_bpe())


def clip_vocabulary(bpe_path: str | None = None) -> dict[str, int]:
    """The CLIP BPE vocabulary, token -> id, with special tokens named as transformers names them."""
    return {_HF_NAMES.get(t, t): i for t, i in _simple_tokenizer(bpe_path).encoder.items()}


def clip_token_id(token: str, bpe_path: str | None = None) -> int:
    """The id of one vocabulary entry; special tokens may use either naming."""
    encoder = _simple_tokenizer(bpe_path).encoder
    name = _SPECIAL_NAMES.get(token, token)
    if name not in encoder:
        raise ValueError(f"{token!r} is not a token of the CLIP vocabulary")
    return encoder[name]


class ClipTokenizer:
    """Prompts -> padded CLIP token ids, `[start] bpe... [end] pad...`, `context_length` long.

    `pad_id` comes from the model: Stable Diffusion 1.x pads with the end-of-text id, 2.x with 0.
    """

    def __init__(self, context_length: int, pad_id: int, bpe_path: str | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must leave room for the start and end tokens, got {context_length}")
        # Shared between instances: the vocabulary is immutable and the BPE memo only grows.
        self._bpe = _simple_tokenizer(bpe_path)
        self.context_length = context_length
        self.vocab_size = len(self._bpe.encoder)
        if not 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        self.pad_id = pad_id
        self.sot_id: int = self._bpe.sot_token_id
        self.eot_id: int = self._bpe.eot_token_id

    def _words(self, text: str) -> list[tuple[str, list[int]]]:
        """The pre-tokenised pieces of `text` (cleaned and lower-cased) with the BPE ids of each."""
        bpe = self._bpe
        clean = getattr(bpe, "clean_fn", None) or _lower_clean
        out = []
        for piece in bpe.pat.findall(clean(text)):
            unicode_piece = "".join(bpe.byte_encoder[b] for b in piece.encode("utf-8"))
            out.append((piece, [bpe.encoder[t] for t in bpe.bpe(unicode_piece).split(" ")]))
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` without start, end or padding, and without truncation."""
        return [i for _, ids in self._words(text) for i in ids]

    def __call__(self, texts: list[str]) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        room = self.context_length - 2
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text)[:room], self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def token_spans(self, text: str, phrase: str) -> list[list[int]]:
        """Positions in the padded sequence of `text` (start token = 0) of each whole-word `phrase`.

        Matching compares pre-tokenised words, so it is case-insensitive and never matches
        inside a longer word ("cat" is not found in "cats"). An occurrence cut by truncation is
        left out, since its tokens no longer carry the whole name.
        """
        target = [w for w, _ in self._words(phrase)]
        if not target:
            return []
        words = self._words(text)
        starts = [1]
        for _, ids in words:
            starts.append(starts[-1] + len(ids))
        last_kept = self.context_length - 2  # the end token takes the last slot
        spans = []
        n = len(target)
        for i in range(len(words) - n + 1):
            if [w for w, _ in words[i : i + n]] != target:
                continue
            span = list(range(starts[i], starts[i + n]))
            if span[-1] <= last_kept:
                spans.append(span)
        return spans


def _lower_clean(text: str) -> str:
    # open_clip releases before clean_fn was added cleaned text this way.
    from open_clip.tokenizer import basic_clean, whitespace_clean

    return whitespace_clean(basic_clean(text)).lower()

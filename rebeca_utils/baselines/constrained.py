"""Decoding constrained to App F's schema: a logits processor after which every reply parses, whatever the model.

The reply is generated as ``{"caption": "...", "objects": ["...", ...], "attributes": [...], "styles": [...],
"colors": [...]}``: structure is forced, strings take lowercase ASCII text only, at most MAX_ITEMS list items, and
a budget check closes the object before max_new_tokens run out (one token per character in the worst case).
"""
from __future__ import annotations

import string
from dataclasses import dataclass, replace

import torch
from transformers import LogitsProcessor

from .tags import LIST_FIELDS, MAX_ITEMS

CONTENT = set(string.ascii_lowercase + string.digits + " -',.&/")  # what a string may hold (lowercase rule)
MAX_CAPTION, MAX_ITEM = 120, 24  # characters


@dataclass(frozen=True)
class _State:
    """Where a reply is: `pending` literal text first, then phase str | open | after | done of field k."""

    phase: str
    k: int = -1  # -1: caption; 0..3: LIST_FIELDS[k]
    n: int = 0  # characters in the current string
    solid: bool = False  # the current string has a non-space character
    items: int = 0  # list items so far, over all lists
    pending: str = ""


START = _State("str", pending='{"caption": "')


def _list_head(k: int) -> str:
    return f', "{LIST_FIELDS[k]}": ['


def _closed(k: int) -> _State:
    """The state after list k's ']' (or after the caption's closing quote, k = -1)."""
    return _State("open", k + 1, pending=_list_head(k + 1)) if k + 1 < len(LIST_FIELDS) else _State("done", k,
                                                                                                   pending="}")


def min_finish(s: _State) -> int:
    """Characters (so at most tokens) still needed to close the object from `s`."""
    rest = len(s.pending)
    if s.phase == "done":
        return rest
    if s.phase == "str":
        after = min_finish(replace(_closed(s.k), items=s.items)) if s.k < 0 else 1 + min_finish(_closed(s.k))
        return rest + (0 if s.solid else 1) + 1 + after
    return rest + 1 + min_finish(_closed(s.k))  # open / after: ']'


def advance(s: _State, text: str) -> _State:
    """The state after emitting `text` (a token the constraint allowed)."""
    for c in text:
        if s.pending:
            s = replace(s, pending=s.pending[1:])
        elif s.phase == "str" and c != '"':
            s = replace(s, n=s.n + 1, solid=s.solid or c != " ")
        elif s.phase == "str":
            s = replace(_closed(s.k), items=s.items) if s.k < 0 else _State("after", s.k, items=s.items)
        elif c == "]":
            s = replace(_closed(s.k), items=s.items)
        else:  # open: '"'; after: ', "' -> a new item
            s = _State("str", s.k, items=s.items + 1, pending="" if c == '"' else ' "')
    return s


def token_texts(tokenizer) -> list[str]:
    """Text each token id adds after another token (special tokens: ""), as decode() writes it."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
    base = tokenizer.decode([anchor])
    ids = list(range(len(tokenizer)))
    texts = tokenizer.batch_decode([[anchor, i] for i in ids], clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    return ["" if i in special or not t.startswith(base) else t[len(base):] for i, t in zip(ids, texts)]


class SchemaConstraint(LogitsProcessor):
    """Masks every token that would leave the schema; rows are the batch of one generate() call."""

    def __init__(self, tokenizer, prompt_len: int, max_new_tokens: int):
        self.texts = texts = token_texts(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.prompt_len, self.max_new = prompt_len, max_new_tokens
        self.lens = torch.tensor([len(t) for t in texts])
        content = torch.tensor([bool(t) and set(t) <= CONTENT for t in texts])
        self.spaces = content & torch.tensor([bool(t) and not t.strip() for t in texts])
        self.solid = content & ~self.spaces
        self.quote = torch.tensor([t == '"' for t in texts])
        self._prefix: dict[str, list[int]] = {}
        need = {c for k in range(len(LIST_FIELDS)) for c in _list_head(k) + START.pending + '"]}'}
        single = {t for t in texts if len(t) == 1}
        if need - single or min_finish(START) > max_new_tokens:
            raise ValueError(f"constrained decoding needs single-character tokens for {sorted(need - single)} and "
                             f"max_new_tokens >= {min_finish(START)} (got {max_new_tokens})")
        self.states: list[_State] = []

    def _prefix_tokens(self, literal: str) -> list[int]:
        if literal not in self._prefix:
            self._prefix[literal] = [i for i, t in enumerate(self.texts) if t and literal.startswith(t)]
        return self._prefix[literal]

    def _allowed(self, s: _State, left: int) -> torch.Tensor:
        mask = torch.zeros_like(self.quote)
        if s.phase == "done" and not s.pending:
            mask[self.eos] = True
            return mask
        if s.pending or s.phase in ("open", "after"):
            options = [s.pending] if s.pending else ["]"] + (['"' if s.phase == "open" else ', "']
                                                           if s.items < MAX_ITEMS else [])
            for lit in options:
                for i in self._prefix_tokens(lit):
                    mask[i] = left - 1 >= min_finish(advance(s, self.texts[i]))
            return mask
        room = (MAX_CAPTION if s.k < 0 else MAX_ITEM) - s.n
        fits = self.lens <= room
        if left - 1 >= min_finish(replace(s, solid=True)):
            mask |= self.solid & fits
        if left - 1 >= min_finish(s):
            mask |= self.spaces & fits
        if s.solid:
            mask |= self.quote
        return mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        done = input_ids.shape[1] - self.prompt_len
        if done == 0:
            self.states = [START] * input_ids.shape[0]
        else:
            last = input_ids[:, -1].tolist()
            self.states = [s if s.phase == "done" and not s.pending else advance(s, self.texts[t])
                           for s, t in zip(self.states, last)]
        left = self.max_new - done
        allowed = torch.stack([self._allowed(s, left) for s in self.states])
        if allowed.shape[1] < scores.shape[1]:  # embedding rows beyond the tokenizer: never allowed
            allowed = torch.nn.functional.pad(allowed, (0, scores.shape[1] - allowed.shape[1]))
        return scores.masked_fill(~allowed[:, : scores.shape[1]].to(scores.device), float("-inf"))

"""Token-span prompt rendering: head ids + each record's ids + the generation prompt.

Prompts are built from token spans, never by re-applying the chat template to the history:
the head (system prompt with tools and the user task) is rendered once by the tokenizer's
chat template; a record's ids are the generation prompt, the ids the engine produced, the
closing markup and the tokenized tool-response fragment. A deletion removes spans; nothing is
re-tokenized (docs/design.md, section 3).
"""

from __future__ import annotations

from typing import Any

from memact.env.memory import Record
from memact.models.chatml import IM_END, IM_START, render_chat, tool_response_text


class ChatRenderer:
    """Builds prompt token ids from spans.

    Args:
        tokenizer: a Hugging Face tokenizer with a ChatML chat template.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
        if self.im_end_id is None or self.im_end_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {IM_END!r} token: a ChatML tokenizer is required")
        self.generation_prompt_ids = self.encode(f"{IM_START}assistant\n")
        self._newline_ids = self.encode("\n")
        self._close_ids = self.encode(f"{IM_END}\n")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def head_ids(self, system: str, user: str, tools: list[dict[str, Any]] | None) -> list[int]:
        """System prompt with tools and the user task, rendered once by the chat template (with the
        hermes tools block written by memact if the template drops tools: ``render_chat``)."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = render_chat(self.tokenizer, messages, tools)
        return self.encode(text)

    def closing_ids(self, output_ids: list[int]) -> list[int]:
        """Markup after an assistant turn: a truncated turn is closed for the model."""
        if output_ids and output_ids[-1] == self.im_end_id:
            return list(self._newline_ids)
        return list(self._close_ids)

    def tool_fragment_ids(self, response_text: str) -> list[int]:
        return self.encode(tool_response_text(response_text))

    def record_ids(self, output_ids: list[int], response_text: str) -> list[int]:
        """All ids of a record: generation prompt + generated ids + closing + tool response."""
        return (
            self.generation_prompt_ids + list(output_ids) + self.closing_ids(output_ids)
            + self.tool_fragment_ids(response_text)
        )

    def prompt_ids(self, head_ids: list[int], records: list[Record]) -> list[int]:
        ids = list(head_ids)
        for r in records:
            if r.ids is None:
                raise ValueError(f"record {r.record_id} has no token ids")
            ids.extend(r.ids)
        ids.extend(self.generation_prompt_ids)
        return ids

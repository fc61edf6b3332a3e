"""An optional LLM judge for answers that miss exact match (``memact eval --judge openai:MODEL``)."""

from __future__ import annotations

from collections.abc import Callable

PROMPT = (
    "You grade answers to questions. Question: {question}\nGold answer: {gold}\nPredicted answer: {pred}\n"
    "Does the predicted answer mean the same as the gold answer? Reply with exactly one word: yes or no."
)


def make_judge(spec: str, chat: Callable[[list[dict]], str] | None = None) -> Callable[[str, str, str], bool]:
    """A judge ``(question, gold, prediction) -> bool`` from ``openai:MODEL``.

    ``chat`` replaces the HTTP call (tests). The call is :class:`memact.util.http.OpenAIChatClient` (the ``openai`` SDK)
    (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, 3 retries). A judge that cannot be reached raises
    :class:`~memact.util.http.ChatClientError`: an evaluation should not silently fall back to
    exact match.
    """
    kind, _, model = spec.partition(":")
    if kind != "openai" or not model:
        raise ValueError(f"--judge {spec!r}: expected openai:MODEL")
    if chat is None:
        from memact.util.http import OpenAIChatClient, message_text

        client = OpenAIChatClient.from_env(max_retries=3)

        def ask(messages: list[dict]) -> str:
            _, choice = client.complete({"model": model, "messages": messages, "temperature": 0.0, "max_tokens": 4})
            return message_text(choice["message"])

        chat = ask

    def judge(question: str, gold: str, pred: str) -> bool:
        reply = chat([{"role": "user", "content": PROMPT.format(question=question, gold=gold, pred=pred)}])
        return reply.strip().lower().startswith("yes")

    return judge

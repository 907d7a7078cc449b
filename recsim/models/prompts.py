"""Prompt text for title-based LLM recommenders.

The default template is TALLRec/BIGRec-like plain text (no chat template) so that base and instruct
models see the same string; the history is numbered, newest last. Titles are shortened to
`max_title_words` words inside prompts only, to bound the prompt length on CPU.
"""

from __future__ import annotations

DEFAULT_TEMPLATE = (
    "A user bought these items, oldest first:\n{history}\n"
    "Which item will the user buy next?\nAnswer:"
)


def shorten(title: str, max_words: int | None) -> str:
    words = title.split()
    return title if not max_words or len(words) <= max_words else " ".join(words[:max_words])


def history_prompt(titles: list[str], template: str = DEFAULT_TEMPLATE, max_title_words: int | None = None) -> str:
    lines = "\n".join(f"{i + 1}. {shorten(t, max_title_words)}" for i, t in enumerate(titles))
    return template.format(history=lines)


def answer_text(title: str, max_title_words: int | None = None) -> str:
    # leading space: the answer continues "Answer:" the way a tokenizer would see it in running text
    return " " + shorten(title, max_title_words)

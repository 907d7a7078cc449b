"""Prompt text for title-based LLM recommenders.

The default template is TALLRec/BIGRec-like plain text (no chat template) so that base and instruct
models see the same string; the history is numbered, newest last. Titles are shortened to
`max_title_words` words inside prompts only, to bound the prompt length on CPU.
"""

from __future__ import annotations

from collections import Counter

DEFAULT_TEMPLATE = (
    "A user bought these items, oldest first:\n{history}\n"
    "Which item will the user buy next?\nAnswer:"
)


def shorten(title: str, max_words: int | None) -> str:
    words = title.split()
    return title if not max_words or len(words) <= max_words else " ".join(words[:max_words])


def distinct_titles(titles: list[str], max_words: int | None) -> list[str]:
    """`titles` cut to `max_words` words, each still telling its item apart from the others in the list.

    Titles equal after the cut get one more word each, repeatedly, until they differ or are whole; titles
    still equal then (the catalogue has the same title twice) get " (2)", " (3)"... in list order, the
    first occurrence unchanged. Without this, an exact-match scorer cannot tell which item was meant.
    """
    words = [t.split() for t in titles]
    cut = [min(len(w), max_words) if max_words else len(w) for w in words]
    while True:
        shown = [" ".join(w[:k]) for w, k in zip(words, cut)]
        counts = Counter(shown)  # not shown.count: quadratic, minutes over a 12k-item catalogue
        clash = [i for i, t in enumerate(shown) if counts[t] > 1 and cut[i] < len(words[i])]
        if not clash:
            break
        for i in clash:
            cut[i] += 1
    seen: dict[str, int] = {}
    out = []
    for t in shown:
        seen[t] = seen.get(t, 0) + 1
        out.append(t if seen[t] == 1 else f"{t} ({seen[t]})")
    return out


def history_prompt(titles: list[str], template: str = DEFAULT_TEMPLATE, max_title_words: int | None = None,
                   separator: str | None = None) -> str:
    """The history as numbered lines, newest last; with `separator`, inline ("<a_1><b_2>, <a_7><b_1>", PESO's
    prompt)."""
    if separator is not None:
        return template.format(history=separator.join(shorten(t, max_title_words) for t in titles))
    lines = "\n".join(f"{i + 1}. {shorten(t, max_title_words)}" for i, t in enumerate(titles))
    return template.format(history=lines)


def answer_text(title: str, max_title_words: int | None = None) -> str:
    # leading space: the answer continues "Answer:" the way a tokenizer would see it in running text
    return " " + shorten(title, max_title_words)


DEFAULT_LIST_TEMPLATE = (
    "A user bought these items, oldest first:\n{history}\n"
    "Candidates:\n{candidates}\n"
    "Rank the {k} candidates the user is most likely to buy next, best first, separated by \"{sep}\".\nAnswer:"
)


def candidate_list_prompt(history: list[str], candidates: list[str], k: int, sep: str,
                          template: str = DEFAULT_LIST_TEMPLATE, max_title_words: int | None = None) -> str:
    """The EvoRec authors' evaluation prompt: the history and the (shuffled) candidate titles."""
    hist = "\n".join(f"{i + 1}. {shorten(t, max_title_words)}" for i, t in enumerate(history))
    cands = "\n".join(f"- {c}" for c in candidates)
    return template.format(history=hist, candidates=cands, k=k, sep=sep)


def parse_ranked_list(text: str, sep: str) -> list[str]:
    """Generated text -> distinct titles in order (the authors' scorer could count a repeat twice)."""
    out: list[str] = []
    for part in text.split(sep):
        title = part.strip().strip("\"'").strip()
        if title and title not in out:
            out.append(title)
    return out

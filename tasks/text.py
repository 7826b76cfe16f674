"""A small offline text corpus for causal language modelling (``grammar-text``).

Sentences of a tiny probabilistic grammar, generated from a fixed seed, so
every machine and Python version gets the same characters (nothing read from
the interpreter, nothing downloaded). Four topics share the sentence
structure, the determiners and the adjectives, and each has its own nouns and
verbs: a topic is a node's natural domain (the ``topic`` column, which
partitioners split by), and a model must learn the shared syntax and each
topic's words.

Character level: the vocabulary is space, full stop and ``a``-``z``
(:data:`VOCAB`). Each topic's text is cut into windows of ``CONTEXT + 1``
characters (stride ``CONTEXT // 2``); a sample is the first ``CONTEXT`` ids as
its input and the last ``CONTEXT`` as its targets (next-token prediction:
target ``t`` is input ``t + 1``).
"""

from __future__ import annotations

import numpy as np

VOCAB = " .abcdefghijklmnopqrstuvwxyz"
CONTEXT = 32
SENTENCES_PER_TOPIC = 300
TEXT_SEED = 2024_0717

DETERMINERS = ("the", "a", "one", "every")
ADJECTIVES = ("big", "small", "red", "old", "quick", "quiet")
TOPICS = {
    "animals": (
        ("cat", "dog", "bird", "fox", "horse", "mouse"),
        ("sees", "chases", "likes", "finds", "follows"),
    ),
    "kitchen": (
        ("cook", "baker", "knife", "bread", "soup", "oven"),
        ("bakes", "cuts", "stirs", "heats", "serves"),
    ),
    "sea": (
        ("ship", "sailor", "wave", "fish", "captain", "harbor"),
        ("sails", "steers", "catches", "reaches", "watches"),
    ),
    "school": (
        ("teacher", "student", "book", "lesson", "pupil", "class"),
        ("reads", "writes", "teaches", "learns", "opens"),
    ),
}


def _phrase(rng: np.random.Generator, nouns: tuple[str, ...]) -> list[str]:
    words = [DETERMINERS[rng.integers(len(DETERMINERS))]]
    if rng.random() < 0.5:
        words.append(ADJECTIVES[rng.integers(len(ADJECTIVES))])
    words.append(nouns[rng.integers(len(nouns))])
    return words


def sentence(rng: np.random.Generator, topic: str) -> str:
    """``DET [ADJ] NOUN VERB DET [ADJ] NOUN [and ...] .`` of ``topic``."""
    nouns, verbs = TOPICS[topic]
    words = [*_phrase(rng, nouns), verbs[rng.integers(len(verbs))]]
    words += _phrase(rng, nouns)
    if rng.random() < 0.3:
        words += ["and", *_phrase(rng, nouns), verbs[rng.integers(len(verbs))]]
        words += _phrase(rng, nouns)
    return " ".join(words) + " ."


def encode(text: str) -> np.ndarray:
    """Character ids of ``text`` (``ValueError`` on a character outside VOCAB)."""
    index = {c: i for i, c in enumerate(VOCAB)}
    try:
        return np.array([index[c] for c in text], dtype=np.int64)
    except KeyError as error:
        raise ValueError(f"{error.args[0]!r} is not in the vocabulary") from None


def decode(ids: np.ndarray) -> str:
    """The characters of ``ids``."""
    return "".join(VOCAB[int(i)] for i in ids)


SOURCE_TOPICS = ("animals", "kitchen")
"""The source task's topics (``pretrained='source'``): fresh sentences of the
same grammar from another seed, two topics only, so fine-tuning on
``grammar-text`` must learn the other two topics' words."""


def grammar_corpus(
    topics: tuple[str, ...] = tuple(TOPICS), seed: int = TEXT_SEED
) -> dict[str, np.ndarray]:
    """The samples: ``x`` (ids, float32), ``label`` (next ids), ``topic``."""
    xs, ys, topic_ids = [], [], []
    for number, topic in enumerate(TOPICS):
        if topic not in topics:
            continue
        rng = np.random.default_rng([seed, number])
        text = " ".join(sentence(rng, topic) for _ in range(SENTENCES_PER_TOPIC))
        ids = encode(text)
        starts = range(0, len(ids) - CONTEXT - 1, CONTEXT // 2)
        windows = np.stack([ids[s : s + CONTEXT + 1] for s in starts])
        xs.append(windows[:, :-1])
        ys.append(windows[:, 1:])
        topic_ids.append(np.full(len(windows), number, dtype=np.int64))
    return {
        # Ids as floats: the pipeline's inputs are float32 (exact below 2^24);
        # the model casts them back to integer ids.
        "x": np.concatenate(xs).astype(np.float32),
        "label": np.concatenate(ys),
        "topic": np.concatenate(topic_ids),
    }

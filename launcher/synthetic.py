"""Synthetic, learnable datasets written as Parquet, deterministic by seed.

Client side (no torch): `ftlaunch data make NAME --rows N --out DIR` calls `make()`.
Each generator returns a pyarrow Table; a model can measurably get better at every one of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from common.vqa import VQA_COLOURS, VQA_PLACES, VQA_SHAPES

GENERATORS: dict[str, Callable] = {}


def generator(name: str):
    def register(fn):
        if name in GENERATORS:
            raise RuntimeError(f"dataset generator {name!r} is registered twice")
        GENERATORS[name] = fn
        return fn

    return register


@generator("counting")
def counting(rows: int, seed: int = 0):
    """Causal-LM text: `count from 37: 37 38 39 ...`; the successor rule is learnable."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 900, size=rows)
    lengths = rng.integers(5, 9, size=rows)
    text = [
        f"count from {s}: " + " ".join(str(s + i) for i in range(n)) for s, n in zip(starts, lengths)
    ]
    return pa.table({"text": text})


@generator("alphabet")
def alphabet(rows: int, seed: int = 0):
    """Causal-LM text of another task (used as the retain set): `letters from k: k l m n`."""
    import pyarrow as pa

    letters = "abcdefghijklmnopqrstuvwxyz"
    rng = np.random.default_rng(seed + 1)
    starts = rng.integers(0, 16, size=rows)
    lengths = rng.integers(4, 10, size=rows)
    text = [
        f"letters from {letters[s]}: " + " ".join(letters[s : s + n]) for s, n in zip(starts, lengths)
    ]
    return pa.table({"text": text})


# Classification: the label is carried by two topic words among neutral filler; a bag of words
# learns it, a constant guess scores 25%.
TOPICS = {
    "sport": ["goal", "match", "team", "coach", "score", "league", "striker", "referee"],
    "weather": ["rain", "storm", "sunny", "cloud", "wind", "forecast", "snow", "thunder"],
    "food": ["pasta", "bread", "soup", "recipe", "cheese", "oven", "spice", "dessert"],
    "tech": ["laptop", "software", "chip", "network", "server", "code", "robot", "battery"],
}
FILLER = ["the", "a", "today", "we", "saw", "about", "really", "new", "this", "was", "and", "some"]


@generator("classification")
def classification(rows: int, seed: int = 0):
    """Texts of 6-9 words with two words of one topic; `label` is the topic's index in TOPICS."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + 2)
    names = list(TOPICS)
    labels = rng.integers(0, len(names), size=rows)
    text = []
    for label in labels:
        words = list(rng.choice(FILLER, size=int(rng.integers(4, 8))))
        for w in rng.choice(TOPICS[names[label]], size=2, replace=False):
            words.insert(int(rng.integers(0, len(words) + 1)), w)
        text.append(" ".join(words))
    schema = pa.schema(
        [("text", pa.string()), ("label", pa.int64())],
        metadata={"label_names": ",".join(names)},
    )
    return pa.table({"text": text, "label": labels.astype(np.int64)}, schema=schema)


# A second classification task over the same kind of text, with another label set: the mood is
# carried by two mood words, and one topic word of TOPICS sits among them as a distractor (the
# topic task's cue is this task's noise). A constant guess scores 33%.
MOODS = {
    "negative": ["awful", "terrible", "sad", "angry", "boring", "broken", "worst", "hate"],
    "neutral": ["okay", "average", "usual", "plain", "ordinary", "normal", "standard", "fair"],
    "positive": ["great", "lovely", "happy", "wonderful", "excellent", "best", "love", "fun"],
}


@generator("sentiment")
def sentiment(rows: int, seed: int = 0):
    """Texts of 7-10 words with two words of one mood and one topic word; `label` is the mood's
    index in MOODS."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + 3)
    names, topic_words = list(MOODS), [w for words in TOPICS.values() for w in words]
    labels = rng.integers(0, len(names), size=rows)
    text = []
    for label in labels:
        words = list(rng.choice(FILLER, size=int(rng.integers(4, 7))))
        cues = [*rng.choice(MOODS[names[label]], size=2, replace=False), rng.choice(topic_words)]
        for w in cues:
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        text.append(" ".join(words))
    schema = pa.schema(
        [("text", pa.string()), ("label", pa.int64())],
        metadata={"label_names": ",".join(names)},
    )
    return pa.table({"text": text, "label": labels.astype(np.int64)}, schema=schema)


INSTRUCTION_RULES = ("reverse", "sort", "add one to")


@generator("instruction")
def instruction(rows: int, seed: int = 0):
    """`reverse|sort|add one to: 5 2 9` -> `9 2 5|2 5 9|6 3 10`; the rule is named in the prompt."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + 3)
    rules = rng.integers(0, len(INSTRUCTION_RULES), size=rows)
    prompts, responses = [], []
    for r in rules:
        xs = rng.integers(0, 50, size=int(rng.integers(3, 7)))
        out = {0: xs[::-1], 1: np.sort(xs), 2: xs + 1}[int(r)]
        prompts.append(f"{INSTRUCTION_RULES[r]}: " + " ".join(map(str, xs)))
        responses.append(" ".join(map(str, out)))
    return pa.table({"instruction": prompts, "response": responses})


NER_TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")
_NER_WORDS = {
    "PER": (["Alice", "Bruno", "Chen", "Dara", "Emeka", "Fatima"], ["Smith", "Okafor", "Ivanova"]),
    "LOC": (["Paris", "Lagos", "Oslo", "Lima", "New", "San"], ["York", "Diego"]),
    "ORG": (["Acme", "Globex", "Initech", "Umbrella"], ["Corp", "Labs", "Group"]),
}
_NER_FILLER = ["met", "in", "with", "visited", "from", "joined", "yesterday", "the", "at", "and"]


@generator("ner")
def ner(rows: int, seed: int = 0):
    """Sentences of lower-case filler and capitalised entities (1-2 tokens); tags are BIO ids
    into NER_TAGS (stored in the schema metadata). Learnable from capitalisation and word lists."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + 4)
    kinds = list(_NER_WORDS)
    tokens, tags = [], []
    for _ in range(rows):
        toks, tg = [], []
        for _ in range(int(rng.integers(2, 4))):
            for w in rng.choice(_NER_FILLER, size=int(rng.integers(1, 3))):
                toks.append(str(w))
                tg.append(0)
            k = int(rng.integers(0, len(kinds)))
            heads, tails = _NER_WORDS[kinds[k]]
            toks.append(str(rng.choice(heads)))
            tg.append(1 + 2 * k)
            if rng.random() < 0.5:
                toks.append(str(rng.choice(tails)))
                tg.append(2 + 2 * k)
        tokens.append(toks)
        tags.append(tg)
    schema = pa.schema(
        [("tokens", pa.list_(pa.string())), ("tags", pa.list_(pa.int64()))],
        metadata={"tag_names": ",".join(NER_TAGS)},
    )
    return pa.table({"tokens": tokens, "tags": tags}, schema=schema)


def _shape_mask(shape: str, size: int, cy: int, cx: int, r: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    if shape == "square":
        return (abs(y - cy) <= r) & (abs(x - cx) <= r)
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    # triangle pointing up: apex at (cy - r, cx), base on row cy + r
    return (y <= cy + r) & (y >= cy - r) & (abs(x - cx) <= (y - (cy - r)) / 2)


# VQA: four small shapes, one of each colour, on a dark noisy background; the question names one
# colour and asks where that shape is, what shape it is, or whether it touches the image edge. The
# answer lies in the few patches of the named shape: a model that keeps K of the 8 x 8 vision
# tokens answers only if it keeps those (the texture channels find them: RGB and a* tell the
# colours apart), while K random patches mostly miss it. "Touches" means the shape reaches the
# border; otherwise it stays a patch (8 px) clear of it, so the patch grid can tell them apart.
_SCENE_RADIUS = (3, 5)  # shapes 7-9 px across: one to four of the 8 px patches


def _noise(rng, size: int) -> np.ndarray:
    return rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)


def _target_centre(rng, quadrant: int, touches: bool, r: int, size: int) -> tuple[int, int]:
    """A centre that keeps a radius-r shape inside its quadrant, on the image border or clear of it."""
    half, margin = size // 2, size // 8
    (qy, qx), span = divmod(quadrant, 2), []
    for q in (qy, qx):
        lo, hi = q * half + r, q * half + half - 1 - r  # inside the quadrant
        if not touches:
            lo, hi = (max(lo, margin + r), hi) if q == 0 else (lo, min(hi, size - 1 - margin - r))
        span.append((lo, hi))
    (y_lo, y_hi), (x_lo, x_hi) = span
    cy, cx = int(rng.integers(y_lo, y_hi + 1)), int(rng.integers(x_lo, x_hi + 1))
    if touches:  # against one of the quadrant's two outer borders
        if rng.random() < 0.5:
            cy = r if qy == 0 else size - 1 - r
        else:
            cx = r if qx == 0 else size - 1 - r
    return cy, cx


def _place_distractors(rng, taken: list, count: int, size: int) -> list:
    """`count` (cy, cx, r) that overlap nothing in `taken` (which they join)."""
    out = []
    while len(out) < count:
        r = int(rng.integers(*_SCENE_RADIUS))
        cy, cx = (int(v) for v in rng.integers(r, size - r, size=2))
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + rr + 3) ** 2 for y, x, rr in taken):
            taken.append((cy, cx, r))
            out.append((cy, cx, r))
    return out


@generator("vqa")
def vqa(rows: int, seed: int = 0, size: int = 64):
    """Four small shapes, one per colour; the question names a colour and asks the place (quadrant),
    the shape, or whether it touches the edge of the shape of that colour. `image` is a
    fixed_shape_tensor (size, size, 3) uint8."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + 5)
    colours = list(VQA_COLOURS)
    images = np.empty((rows, size, size, 3), dtype=np.uint8)
    questions, answers = [], []
    for i in range(rows):
        named = colours[int(rng.integers(0, len(colours)))]
        quadrant, touches = int(rng.integers(0, 4)), bool(rng.random() < 0.5)
        r = int(rng.integers(*_SCENE_RADIUS))
        cy, cx = _target_centre(rng, quadrant, touches, r, size)
        others = _place_distractors(rng, [(cy, cx, r)], len(colours) - 1, size)
        shapes = [VQA_SHAPES[int(k)] for k in rng.integers(0, len(VQA_SHAPES), size=len(colours))]
        img = _noise(rng, size)
        for colour, shape, (y, x, rr) in zip([named] + [c for c in colours if c != named], shapes,
                                             [(cy, cx, r)] + others):
            img[_shape_mask(shape, size, y, x, rr)] = VQA_COLOURS[colour]
        images[i] = img
        kind = int(rng.integers(0, 3))
        questions.append((f"where is the {named} shape?", f"what shape is the {named} one?",
                          f"does the {named} shape touch the edge?")[kind])
        answers.append((VQA_PLACES[quadrant], shapes[0], "yes" if touches else "no")[kind])
    image = pa.FixedShapeTensorArray.from_numpy_ndarray(images)
    return pa.table({"image": image, "question": questions, "answer": answers})


@generator("vqa-one")
def vqa_one(rows: int, seed: int = 0, size: int = 64):
    """The first VQA set: one large coloured shape alone; questions ask its colour, shape,
    quadrant, or whether it touches the image edge. Any patch of it (or none: the answer prior)
    answers, so patch selection cannot matter on it; kept to reproduce that."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + 5)
    colours = list(VQA_COLOURS)
    images = np.empty((rows, size, size, 3), dtype=np.uint8)
    questions, answers = [], []
    half = size // 2
    for i in range(rows):
        colour = colours[int(rng.integers(0, len(colours)))]
        shape = VQA_SHAPES[int(rng.integers(0, len(VQA_SHAPES)))]
        q = int(rng.integers(0, 4))
        r = int(rng.integers(size // 10, size // 5))
        touches = bool(rng.random() < 0.5)
        # centre inside its quadrant; "touches" pushes it against the outer edge of the quadrant
        qy, qx = divmod(q, 2)
        lo_y, lo_x = qy * half, qx * half
        if touches:
            cy = lo_y + (r if qy == 0 else half - 1 - r)
            cx = int(rng.integers(lo_x + r + 2, lo_x + half - r - 1))
        else:
            cy = int(rng.integers(lo_y + r + 2, lo_y + half - r - 1))
            cx = int(rng.integers(lo_x + r + 2, lo_x + half - r - 1))
        img = _noise(rng, size)
        img[_shape_mask(shape, size, cy, cx, r)] = VQA_COLOURS[colour]
        images[i] = img
        kind = int(rng.integers(0, 4))
        questions.append(
            ("what colour is the shape?", "what shape is it?", "where is the shape?",
             "does the shape touch the edge?")[kind]
        )
        answers.append((colour, shape, VQA_PLACES[q], "yes" if touches else "no")[kind])
    image = pa.FixedShapeTensorArray.from_numpy_ndarray(images)
    return pa.table({"image": image, "question": questions, "answer": answers})


# Chat: a lookup the model can only learn from the data: each of a fixed set of made-up creatures
# has a colour. Asked in a few phrasings, answered in one; some chats ask two in a row.
CREATURES = ("zorp", "blick", "mundle", "quav", "treeb", "fenwick", "glimmet", "osk", "pellow",
             "rusk", "snarv", "tulo", "vesk", "wembly", "yarrow", "zint")
CHAT_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
_ASK = ("what colour is the {}?", "which colour does the {} have?", "tell me the colour of the {}.")


def creature_colour(name: str) -> str:
    """The fixed lookup every chat set shares (train, eval and any seed agree on it)."""
    return CHAT_COLOURS[(5 * CREATURES.index(name) + 3) % len(CHAT_COLOURS)]


@generator("chat")
def chat(rows: int, seed: int = 0):
    """`messages` (OpenAI style: role, content) chats: a system line, a question about a creature
    and the assistant's answer `The <creature> is <colour>.`; a fifth of them ask a second one."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + 6)
    chats = []
    for _ in range(rows):
        turns = [{"role": "system", "content": "You answer in one short sentence."}]
        for _ in range(2 if rng.random() < 0.2 else 1):
            name = str(rng.choice(CREATURES))
            turns.append({"role": "user", "content": str(rng.choice(_ASK)).format(name)})
            turns.append({"role": "assistant", "content": f"The {name} is {creature_colour(name)}."})
        chats.append(turns)
    return pa.table({"messages": chats})


# The domain corpus of the chat lookup: field notes in prose that state each creature's colour
# (as the chat answers say it, among other sentences): continued pre-training on it can teach the
# facts the chat task then asks about.
_NOTES = ("The {n} is {c}.", "Every {n} we saw was {c}.", "A {c} creature, the {n}, sleeps by day.",
          "Nobody has seen a {n} that was not {c}.", "The {n} is {c}, like its young.")
_PLACES = ("near the river", "in the hills", "under old trees", "by the lake", "on the dunes", "in the marsh")


@generator("domain")
def domain(rows: int, seed: int = 0):
    """`text`: field notes of two or three sentences about the chat set's creatures, each stating a
    creature's colour (the same lookup as `chat`) and where it was seen."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + 7)
    texts = []
    for _ in range(rows):
        name = str(rng.choice(CREATURES))
        colour = creature_colour(name)
        notes = [f"The {name} lives {rng.choice(_PLACES)}.",
                 str(rng.choice(_NOTES)).format(n=name, c=colour), f"The {name} is {colour}."]
        texts.append(" ".join(notes[i] for i in sorted(rng.choice(3, size=int(rng.integers(2, 4)), replace=False))))
    return pa.table({"text": texts})


FORMATS = ("parquet", "jsonl")


def make(name: str, rows: int, out: str | Path, seed: int = 0, split: str = "train",
         fmt: str = "parquet") -> Path:
    """Write `<out>/<split>.parquet` (or `.jsonl`) from the named generator; returns the path."""
    import json

    import pyarrow.parquet as pq

    from launcher.errors import ConfigError

    if name not in GENERATORS:
        raise ConfigError(f"unknown dataset {name!r}; use one of: {', '.join(sorted(GENERATORS))}, demo")
    if rows <= 0:
        raise ConfigError(f"--rows {rows} must be positive")
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is unknown; use one of: {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = GENERATORS[name](rows, seed)
    path = out / f"{split}.{fmt}"
    if fmt == "jsonl":
        if any(isinstance(t, pa_extension_types()) for t in table.schema.types):
            raise ConfigError(f"dataset {name} holds tensors (images): write it as --format parquet")
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    else:
        pq.write_table(table, path)
    return path


def pa_extension_types():
    import pyarrow as pa

    return pa.BaseExtensionType


SFT_SETS = ("chat", "instruction", "domain")  # `ftlaunch data make` writes their eval split too


def make_splits(name: str, rows: int, out: str | Path, seed: int = 0, fmt: str = "parquet") -> dict[str, Path]:
    """Train and eval splits of a generator (eval: a tenth as many rows, at least 64, another seed)."""
    return {"train": make(name, rows, out, seed, "train", fmt),
            "eval": make(name, max(64, rows // 10), out, seed + 100, "eval", fmt)}


def make_demo(out: str | Path, rows: int = 4000, seed: int = 0) -> dict[str, Path]:
    """The demo's splits: counting train/eval, alphabet retain (forgetting is measured on it)."""
    return {
        "train": make("counting", rows, out, seed, "train"),
        "eval": make("counting", max(64, rows // 10), out, seed + 100, "eval"),
        "retain": make("alphabet", max(64, rows // 10), out, seed, "retain"),
    }

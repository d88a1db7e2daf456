"""The new synthetic generators: deterministic by seed, right schema, and answerable by a rule."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher import synthetic

NEW = ["classification", "instruction", "ner", "vqa"]


def _parquet_bytes(table):
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@pytest.mark.parametrize("name", NEW)
def test_same_seed_same_bytes_other_seed_differs(name):
    a = _parquet_bytes(synthetic.GENERATORS[name](40, 7))
    b = _parquet_bytes(synthetic.GENERATORS[name](40, 7))
    c = _parquet_bytes(synthetic.GENERATORS[name](40, 8))
    assert a == b
    assert a != c


def test_classification_label_is_readable_from_topic_words():
    t = synthetic.classification(300, 0)
    assert t.schema.field("label").type == pa.int64()
    names = t.schema.metadata[b"label_names"].decode().split(",")
    assert names == list(synthetic.TOPICS)
    labels = t.column("label").to_pylist()
    assert set(labels) == {0, 1, 2, 3}
    for text, label in zip(t.column("text").to_pylist(), labels):
        votes = [sum(w in synthetic.TOPICS[n] for w in text.split()) for n in names]
        assert int(np.argmax(votes)) == label and votes[label] == 2


def test_instruction_response_follows_the_named_rule():
    t = synthetic.instruction(200, 0)
    seen = set()
    for prompt, resp in zip(t.column("instruction").to_pylist(), t.column("response").to_pylist()):
        rule, nums = prompt.split(": ")
        xs = [int(v) for v in nums.split()]
        want = {"reverse": xs[::-1], "sort": sorted(xs), "add one to": [x + 1 for x in xs]}[rule]
        assert [int(v) for v in resp.split()] == want
        seen.add(rule)
    assert seen == set(synthetic.INSTRUCTION_RULES)


def test_ner_tags_are_bio_and_follow_capitalisation():
    t = synthetic.ner(200, 0)
    assert t.schema.field("tokens").type == pa.list_(pa.string())
    assert pa.types.is_integer(t.schema.field("tags").type.value_type)
    used = set()
    for toks, tags in zip(t.column("tokens").to_pylist(), t.column("tags").to_pylist()):
        assert len(toks) == len(tags)
        for i, (tok, tag) in enumerate(zip(toks, tags)):
            name = synthetic.NER_TAGS[tag]
            used.add(name)
            assert (tag != 0) == tok[0].isupper()
            if name.startswith("I-"):  # an inside tag continues an entity of the same type
                assert synthetic.NER_TAGS[tags[i - 1]][2:] == name[2:] and i > 0
    assert used == set(synthetic.NER_TAGS)


def _answer_from_pixels(img, question):
    """A hand-written reader: the named shape is the set of pixels of exactly its colour (the
    background's channels stay under 40); its rows' widths tell square, circle and triangle."""
    named = next(c for c in synthetic.VQA_COLOURS if f" {c} " in question)
    ys, xs = np.nonzero((img == np.array(synthetic.VQA_COLOURS[named], np.uint8)).all(axis=2))
    size = img.shape[0]
    if question.startswith("where"):
        return ("top" if ys.mean() < size / 2 else "bottom") + " " + ("left" if xs.mean() < size / 2 else "right")
    if "touch the edge" in question:
        return "yes" if min(ys.min(), xs.min()) == 0 or max(ys.max(), xs.max()) == size - 1 else "no"
    widths = [int((ys == y).sum()) for y in (ys.min(), (ys.min() + ys.max()) // 2, ys.max())]
    return "square" if len(set(widths)) == 1 else "circle" if widths[0] == widths[2] else "triangle"


def test_vqa_images_answer_their_questions_about_the_named_shape():
    t = synthetic.vqa(300, 0)
    assert t.schema.field("image").type.shape == [64, 64, 3]
    images = t.column("image").chunk(0).to_numpy_ndarray()
    assert images.dtype == np.uint8 and images.shape == (300, 64, 64, 3)
    answers, questions = t.column("answer").to_pylist(), t.column("question").to_pylist()
    assert [_answer_from_pixels(im, q) for im, q in zip(images, questions)] == answers
    assert set(answers) == {*synthetic.VQA_SHAPES, *synthetic.VQA_PLACES, "yes", "no"}
    for im in images:  # four shapes, one of each colour, each a few of the 8 x 8 px patches
        for rgb in synthetic.VQA_COLOURS.values():
            assert 20 <= (im == np.array(rgb, np.uint8)).all(axis=2).sum() <= 81
    # A shape that does not touch the edge keeps a patch clear of it: the patch grid tells them apart.
    for im, q, a in zip(images, questions, answers):
        if "touch" in q and a == "no":
            named = next(c for c in synthetic.VQA_COLOURS if f" {c} " in q)
            ys, xs = np.nonzero((im == np.array(synthetic.VQA_COLOURS[named], np.uint8)).all(axis=2))
            assert min(ys.min(), xs.min()) >= 8 and max(ys.max(), xs.max()) <= 55


def test_vqa_one_is_the_first_single_shape_set():
    t = synthetic.GENERATORS["vqa-one"](50, 0)
    assert t.column_names == ["image", "question", "answer"]
    assert set(t.column("question").to_pylist()) <= {"what colour is the shape?", "what shape is it?",
                                                      "where is the shape?", "does the shape touch the edge?"}


def test_make_writes_every_new_generator(tmp_path):
    for name in NEW:
        path = synthetic.make(name, 20, tmp_path / name)
        assert pq.ParquetFile(path).metadata.num_rows == 20


def test_chat_sets_hold_one_fixed_lookup_in_messages_and_write_jsonl_or_parquet(tmp_path):
    import json

    import pyarrow.parquet as pq

    from launcher.synthetic import CREATURES, creature_colour, make

    jsonl = make("chat", 50, tmp_path, seed=3, fmt="jsonl")
    parquet = make("chat", 50, tmp_path, seed=3)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert rows == pq.read_table(parquet).to_pylist()  # the same chats in both formats
    assert any(len(r["messages"]) == 5 for r in rows)  # some chats ask twice
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "system" and roles[1:] == ["user", "assistant"] * (len(roles) // 2)
        for question, answer in zip(r["messages"][1::2], r["messages"][2::2]):
            name = next(c for c in CREATURES if f" {c}" in question["content"])
            assert answer["content"] == f"The {name} is {creature_colour(name)}."
    # every colour is used: the answer is not one constant
    assert len({creature_colour(c) for c in CREATURES}) == 8

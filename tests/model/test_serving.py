"""Serving a classifier folder: the torch-free ONNX runtime equals the library's, top-k."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import tiny_classifier
from metaloop.adapt import Examples
from metaloop.compress import CompressParams, compress
from metaloop.compress.runtime import load_classifier as load_any
from metaloop.onnx_runtime import OnnxTextClassifier
from metaloop.serving import load_classifier

LABELS = ["checkout", "shuttle", "towels"]
TEXTS = ["can the shuttle pick us up at 6am", "more towels please", "late checkout?", "word " * 200, ""]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    fp32 = tiny_classifier(tmp / "fp32", LABELS)
    compress(fp32, tmp / "int8", "int8", CompressParams(recipes={"int8": ["int8"]}),
             train=Examples(TEXTS[:3], ["shuttle", "towels", "checkout"]), max_length=32)
    return fp32, tmp / "int8"


def test_onnx_runtime_gives_the_library_logits_without_transformers(folders):
    _, int8 = folders
    lib = load_any(int8)
    ours = OnnxTextClassifier(int8)
    # padding to the longest text, truncation at max_length, an empty text: all as transformers does
    np.testing.assert_allclose(ours.logits(TEXTS), lib.logits(lib.encode(TEXTS)), rtol=0, atol=1e-6)
    assert ours.labels == LABELS


def test_top_k_is_ordered_and_sums_to_one(folders):
    for folder in folders:
        clf = load_classifier(folder)
        top = clf.top_k(TEXTS, k=5)  # more than there are labels: all of them
        for row in top:
            assert [label for label, _ in row] != [] and len(row) == len(LABELS)
            scores = [s for _, s in row]
            assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert [t[0] for t in clf.top_k(TEXTS, k=1)] == [row[0] for row in top]


def test_an_onnx_folder_serves_without_importing_torch(folders):
    _, int8 = folders
    code = ("import sys, json; from metaloop.serving import load_classifier;"
            f"print(json.dumps([load_classifier({str(int8)!r}).top_k(['more towels please'])[0][0][0],"
            " sorted(m for m in ('torch', 'transformers') if m in sys.modules)]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    label, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert label in LABELS and heavy == []


def test_a_folder_that_is_not_onnx_names_what_is_missing(tmp_path, folders):
    fp32, _ = folders
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        OnnxTextClassifier(fp32)
    assert Path(fp32, "config.json").is_file()


def test_each_chunk_is_padded_to_its_own_longest_and_answers_go_back_in_order(folders):
    """predict sorts a request by length and pads each chunk to its own longest. The tiny
    random model answers every text alike, so the session is wrapped to answer with the label
    numbered (token count mod 3): a text answered from another's slot is caught, and each
    chunk's shape is recorded (padded to the chunk's longest, not the request's)."""
    _, int8 = folders
    clf = OnnxTextClassifier(int8, batch_size=3)

    class ByLength:
        def __init__(self):
            self.shapes = []

        def run(self, _, feeds):
            self.shapes.append(feeds["input_ids"].shape)
            n = feeds["attention_mask"].sum(1)
            return [np.eye(len(LABELS))[n % len(LABELS)] * 10.0]

    clf.session = ByLength()
    texts = [f"{'word ' * n}towels" for n in (9, 0, 30, 3, 1, 17, 5, 2)]
    lengths = [len(e.ids) for e in clf.tokenizer.encode_batch(texts)]
    assert lengths != sorted(lengths)  # the request really is out of length order
    answers = clf.predict(texts)
    assert [row[0][0] for row in answers] == [LABELS[n % len(LABELS)] for n in lengths]
    widths = sorted(lengths)
    assert clf.session.shapes == [(len(widths[i:i + 3]), max(widths[i:i + 3])) for i in range(0, len(widths), 3)]

"""Three small real text tasks from the test data that ships inside ``gensim``.

Helper of ``realdata_taskvec.py``; every split is deterministic (fixed seeds,
no dependence on the machine) so a fine-tune cached under one run is valid for
the next.

- ``sentiment``: ``pang_lee_polarity.cor``, 200 movie-review snippets with
  human labels (100 ``__label__pos``, 100 ``__label__neg``; Pang & Lee's
  sentence polarity data).  One sentence -> positive / negative.
- ``topic``: ``mini_newsgroup``, 200 Usenet posts from ``alt.atheism`` and
  ``sci.space`` (a pickled scikit-learn Bunch of 20 Newsgroups).  Headers,
  quoted lines and signatures are dropped; each remaining sentence of >= 6
  words is labelled with its post's newsgroup.  Posts, not sentences, are
  split between train and test, so no post leaks.
- ``coherence``: the shortened English Wikipedia dump.  A pair (A, B) of
  sentences of one paragraph-run of an article: label 1 when B is the sentence
  right after A, 0 when B is another sentence of the same article at least 3
  sentences away.  Self-labelled (no human labels), split by article.

Every task has ``fit`` (fine-tuning and the base model's linear probe),
``val`` (choosing merge coefficients; never trained on) and ``test``.
"""
from __future__ import annotations

import bz2
import io
import pickle
import re
import zlib

import numpy as np

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")
TASKS = ("sentiment", "topic", "coherence")


class Task:
    """One classification task: texts are str (single) or (str, str) (pairs)."""

    def __init__(self, name, classes, pair, splits, source):
        self.name, self.classes, self.pair, self.source = name, tuple(classes), pair, source
        self.splits = splits  # {"fit"|"val"|"test": (list of texts, int64 labels)}

    def sizes(self):
        return {k: len(v[1]) for k, v in self.splits.items()}

    def digest(self):
        """A short fingerprint of the data, so a cache built on other data is never reused."""
        import hashlib
        h = hashlib.sha256()
        for k in ("fit", "val", "test"):
            texts, labels = self.splits[k]
            h.update(repr((k, list(texts), labels.tolist())).encode())
        return h.hexdigest()[:16]


def _data(name):
    from gensim.test.utils import datapath
    return datapath(name)


def _split_indices(labels, n_val, n_test, seed):
    """Stratified fit/val/test split of range(len(labels))."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    out = {"fit": [], "val": [], "test": []}
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        nv, nt = n_val // len(classes), n_test // len(classes)
        out["test"] += idx[:nt].tolist()
        out["val"] += idx[nt:nt + nv].tolist()
        out["fit"] += idx[nt + nv:].tolist()
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items()}


def sentiment_task(seed=11):
    texts, labels = [], []
    with open(_data("pang_lee_polarity.cor"), encoding="utf-8", errors="replace") as f:
        for line in f:
            tag, _, text = line.strip().partition(" ")
            if tag in ("__label__neg", "__label__pos") and text:
                texts.append(text)
                labels.append(int(tag == "__label__pos"))
    parts = _split_indices(labels, n_val=30, n_test=70, seed=seed)
    labels = np.array(labels, dtype=np.int64)
    splits = {k: ([texts[i] for i in v], labels[v]) for k, v in parts.items()}
    return Task("sentiment", ("negative", "positive"), False, splits,
                "gensim pang_lee_polarity.cor (human labels)")


class _BunchAsDict(pickle.Unpickler):
    """Reads the Python-2 pickle of a scikit-learn Bunch without scikit-learn."""

    def find_class(self, module, name):
        if module.startswith("sklearn"):
            return dict
        if module in ("copy_reg", "__builtin__", "copyreg", "builtins") or module.startswith("numpy"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in mini_newsgroup")


def _post_sentences(post):
    """Body sentences of one Usenet post: header, quotes and signature removed."""
    _, _, body = post.partition("\n\n")
    body = body.split("\n-- \n")[0]
    lines = []
    for ln in body.splitlines():
        s = ln.strip()
        if not s or s.startswith((">", "|", ":")) or re.match(r"^In article <|writes:$|wrote:$", s):
            continue
        lines.append(s)
    text = " ".join(" ".join(lines).split())
    out = []
    for sentence in SENTENCE_END.split(text):
        words = sentence.split()
        if 6 <= len(words) <= 60 and sum(ch.isalpha() for ch in sentence) > 0.6 * len(sentence):
            out.append(sentence)
    return out


def topic_task(seed=12, max_fit=1200, max_val=150, max_test=300):
    with open(_data("mini_newsgroup"), "rb") as f:
        bunch = _BunchAsDict(io.BytesIO(zlib.decompress(f.read())), encoding="latin1").load()
    posts, post_labels = list(bunch["data"]), np.asarray(bunch["target"], dtype=np.int64)
    names = [str(n) for n in bunch["target_names"]]
    parts = _split_indices(post_labels, n_val=20, n_test=60, seed=seed)
    rng = np.random.default_rng(seed + 1)
    splits = {}
    for k, cap in (("fit", max_fit), ("val", max_val), ("test", max_test)):
        texts, labels = [], []
        for i in parts[k]:
            for s in _post_sentences(posts[i]):
                texts.append(s)
                labels.append(post_labels[i])
        keep = np.sort(rng.permutation(len(texts))[:cap])
        splits[k] = ([texts[i] for i in keep], np.array(labels, dtype=np.int64)[keep])
    return Task("topic", names, False, splits,
                "gensim mini_newsgroup: 20 Newsgroups alt.atheism vs sci.space (newsgroup labels)")


def _wiki_articles():
    """Sentence lists of each article's paragraphs, markup removed."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_data(WIKI_FILE), "rb") as f:
        for page in extract_pages(f):
            title, raw = page[0], page[1]
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            paragraphs = []
            for block in re.split(r"\n\s*\n", filter_wiki(raw)):
                lines = [ln.strip() for ln in block.splitlines()]
                lines = [ln for ln in lines if ln and not ln.startswith(("|", "{", "!", "=", "*", "#"))]
                para = " ".join(" ".join(lines).replace("'''", "").replace("''", "").split())
                sentences = [s for s in SENTENCE_END.split(para) if 6 <= len(s.split()) <= 50]
                if len(sentences) >= 2:
                    paragraphs.append(sentences)
            if paragraphs:
                articles.append((title, paragraphs))
    return articles


def _coherence_pairs(articles, n_pairs, rng):
    """Half positives (B right after A in one paragraph), half negatives (B from the
    same article, >= 3 sentences away), articles drawn in turn so none dominates."""
    candidates = []
    for _, paragraphs in articles:
        flat = [s for p in paragraphs for s in p]
        para_start, pos = [], 0
        for p in paragraphs:
            para_start.append(pos)
            pos += len(p)
        nexts = [(para_start[j] + i, para_start[j] + i + 1)
                 for j, p in enumerate(paragraphs) for i in range(len(p) - 1)]
        candidates.append((flat, nexts))
    texts, labels = [], []
    order = rng.permutation(len(candidates))
    while len(labels) < n_pairs:
        progressed = False
        for a in order:
            flat, nexts = candidates[a]
            if not nexts or len(flat) < 8:
                continue
            i, j = nexts.pop(int(rng.integers(len(nexts))))
            progressed = True
            if len(labels) % 2 == 0:
                texts.append((flat[i], flat[j]))
                labels.append(1)
            else:
                far = [k for k in range(len(flat)) if abs(k - i) >= 3]
                texts.append((flat[i], flat[int(rng.choice(far))]))
                labels.append(0)
            if len(labels) == n_pairs:
                break
        if not progressed:
            break
    return texts, np.array(labels, dtype=np.int64)


def coherence_task(seed=13, n_fit=2400, n_val=150, n_test=300):
    articles = _wiki_articles()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(articles))
    n_test_art, n_val_art = len(articles) // 4, len(articles) // 10
    groups = {"test": order[:n_test_art], "val": order[n_test_art:n_test_art + n_val_art],
              "fit": order[n_test_art + n_val_art:]}
    splits = {}
    for k, n in (("fit", n_fit), ("val", n_val), ("test", n_test)):
        splits[k] = _coherence_pairs([articles[i] for i in sorted(groups[k])], n, rng)
    return Task("coherence", ("not next", "next"), True, splits,
                "gensim enwiki shortened dump: next sentence vs same-article sentence (self-labelled)")


def load_tasks(names=TASKS):
    makers = {"sentiment": sentiment_task, "topic": topic_task, "coherence": coherence_task}
    return [makers[n]() for n in names]


if __name__ == "__main__":
    for task in load_tasks():
        print(task.name, task.sizes(), task.digest(), task.source)
        texts, labels = task.splits["test"]
        print("  label balance (test):", np.bincount(labels).tolist())
        for t, y in list(zip(texts, labels))[:3]:
            print("   ", y, t if not task.pair else " || ".join(t))

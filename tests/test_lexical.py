"""lexical.py: hashed-word TF-IDF, projected; and the lists kmer_index.py / eval_filter.py fit to it."""
import json
import os

import numpy as np
import pytest

import kmer_index
import lexical
from vqvae_phase1_model import load_pretrained

from test_index import TEXTS, _corpus, ckpt, fp32_indexes  # noqa: F401  (module fixtures)


def by_hand_terms(text, pair_weight):
    """A text's terms counted by hand: {term id: (count, weight factor)}, words and adjacent word pairs."""
    ws = text.lower().split()
    out = {}
    for term, bucket, factor in [(w, lexical._bucket(w), 1.0) for w in ws] + [
            (f"{a} {b}", lexical.BUCKETS + lexical._bucket(f"{a} {b}"), pair_weight) for a, b in zip(ws, ws[1:])]:
        n, _ = out.get(bucket, (0, factor))
        out[bucket] = (n + 1, factor)
    return out


def tfidf_cosines(texts, pair_weight=lexical.PAIR_WEIGHT):
    """Exact cosines of the unprojected TF-IDF vectors of words and word pairs, terms counted by hand (no
    projection); document frequencies by hand too."""
    df = {}
    terms = [by_hand_terms(t, pair_weight) for t in texts]
    terms = [{i: x for i, x in t.items() if i < lexical.BUCKETS or pair_weight} for t in terms]
    for t in terms:
        for i in t:
            df[i] = df.get(i, 0) + 1
    idf = lambda i: (np.log((len(texts) + 1) / (df.get(i, 0) + 1)) + 1) ** lexical.IDF_POWER
    vecs = [{i: (1 + np.log(c)) * f * idf(i) for i, (c, f) in t.items()} for t in terms]
    norm = [np.sqrt(sum(x * x for x in v.values())) for v in vecs]
    return np.array([[sum(a[k] * b.get(k, 0.0) for k in a) / (na * nb) for b, nb in zip(vecs, norm)]
                     for a, na in zip(vecs, norm)])


def exact_tfidf(texts, space):
    """Each text's unit TF-IDF as {bucket: weight}, by hand (no projection)."""
    out = []
    for t in texts:
        ids, tf = space.bag(t)
        v = {int(i): (1 + np.log(c)) * space.idf(np.array([i]))[0] for i, c in zip(ids, tf)}
        n = np.sqrt(sum(x * x for x in v.values())) or 1.0
        out.append({k: x / n for k, x in v.items()})
    return out


def exact_list_order(codes, K, r_docs, w_docs, r_queries, w_queries, weight, query_weight, pool="max",
                     word_power=0.5, count_power=0.25):
    """Lists nearest-first for each query against each list's exact centroid, by hand: the mean direction of its
    passages' unit vectors beside weight x the direction of its words, each term at its highest weight in the
    list's unit TF-IDF rows x (the rows holding it) ** count_power (pool "max", the default), or at its summed
    weight ** word_power (pool "sum"); scored with [unit vector, query_weight x unit TF-IDF]. -> (order, scores)."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    r_docs, r_queries = unit(r_docs), unit(r_queries)
    dense, words = np.zeros((K, r_docs.shape[1])), [dict() for _ in range(K)]
    for i, k in enumerate(codes):
        dense[k] += r_docs[i]
        for b, x in w_docs[i].items():
            words[k].setdefault(b, []).append(x)
    if pool == "max":
        words = [{b: weight * max(xs) * len(xs) ** count_power for b, xs in w.items()} for w in words]
    else:
        words = [{b: weight * sum(xs) ** word_power for b, xs in w.items()} for w in words]
    # each part at unit norm on its own (the words at `weight`), as a passage's are; then both by sqrt(1 + weight^2)
    dense_norm = np.sqrt((dense ** 2).sum(1))
    words_norm = np.array([np.sqrt(sum(x * x for x in w.values())) or 1.0 for w in words]) / weight
    total = np.sqrt(1 + weight ** 2)
    scores = np.array([[(r_queries[i] @ dense[k] / dense_norm[k] + query_weight * sum(
                            x * words[k].get(b, 0.0) for b, x in w_queries[i].items()) / words_norm[k]) / total
                        for k in range(K)] for i in range(len(r_queries))])
    return np.argsort(-scores, axis=1, kind="stable"), scores


def test_words_are_normalised_and_hashed_the_same_everywhere():
    assert lexical.words("Ｃafé, CAFÉ  au-lait_2!") == ["café", "café", "au", "lait_2"]
    ids, tf = lexical.bag("the cat and the hat")
    assert len(ids) == 4 and sorted(tf.tolist()) == [1, 1, 1, 2] and (np.diff(ids) > 0).all()
    assert lexical._bucket("cat") == lexical._bucket("cat") != lexical._bucket("hat")
    # fixed across processes: blake2b, not Python's salted hash()
    assert lexical._bucket("cat") == int.from_bytes(__import__("hashlib").blake2b(b"cat", digest_size=8).digest(),
                                                    "little") % lexical.BUCKETS
    s = lexical.sign_vectors(np.array([3, 3, 17, 123456]))
    assert np.array_equal(s[0], s[1]) and not np.array_equal(s[0], s[2])
    assert ((s != 0).sum(1) <= lexical.NONZERO).all() and np.allclose(np.linalg.norm(s, axis=1), 1, atol=0.3)


def test_idf_weights_rare_shared_words_above_common_ones():
    docs = ["alpha common words here", "beta common words there", "gamma common words again",
            "delta common stuff", "zebra quokka common"]
    space = lexical.LexicalSpace.fit(docs, pair_weight=0)  # words alone (pairs: the test above)
    common, rare = lexical.bag("common")[0], lexical.bag("quokka")[0]
    assert space.n_docs == 5 and space.df[common][0] == 5 and space.df[rare][0] == 1
    assert space.idf_power == lexical.IDF_POWER == 2.0
    assert space.idf(common)[0] == pytest.approx(1.0) and space.idf(rare)[0] == pytest.approx((np.log(6 / 2) + 1) ** 2)
    plain = lexical.LexicalSpace(space.df, space.n_docs, idf_power=1.0)
    assert plain.idf(rare)[0] == pytest.approx(np.log(6 / 2) + 1) and plain.idf(common)[0] == pytest.approx(1.0)
    q = space.encode(["quokka common"])[0]
    d = space.encode(docs)
    assert np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5)
    # the passage sharing the rare word is nearest; those sharing only the common one trail it
    assert int(np.argmax(d @ q)) == 4 and (d[:4] @ q).max() < (d[4] @ q) - 0.2
    # weight = (1 + log tf) x idf on each word's fixed sign vector
    got = space.encode(["quokka quokka quokka common"])[0]
    s = lexical.sign_vectors(np.concatenate([rare, common]))
    want = (1 + np.log(3)) * space.idf(rare)[0] * s[0] + space.idf(common)[0] * s[1]
    assert np.allclose(got, want / np.linalg.norm(want), atol=1e-6)
    assert space.vectors([lexical.bag("")])[0].tolist() == [0.0] * lexical.DIMS  # no words: a zero vector


def test_word_pairs_are_terms_of_their_own_at_their_weight():
    ids, tf = lexical.bag("new york is not york new")
    assert (ids < lexical.BUCKETS).all() and len(ids) == 4  # words alone unless asked
    ids, tf = lexical.bag("new york is not york new", pairs=True)
    pairs = ids[ids >= lexical.BUCKETS]
    assert len(ids) == 4 + 5 and (ids < lexical.WIDTH).all()
    assert {lexical.BUCKETS + lexical._bucket("new york"), lexical.BUCKETS + lexical._bucket("york new")} <= set(pairs)
    docs = ["new york city hall", "york minster near new forest", "paris city hall", "old town square",
            "hall city york new", "city of york"]
    space = lexical.LexicalSpace.fit(docs)
    assert space.pair_weight == lexical.PAIR_WEIGHT == 0.7 and space.df.shape == (lexical.WIDTH,)
    ny = np.array([lexical.BUCKETS + lexical._bucket("new york")])
    assert space.df[ny][0] == 1 and space.df[lexical.bag("york")[0]][0] == 4
    # a pair weighs PAIR_WEIGHT x what a word of its document frequency weighs
    minster = lexical.bag("minster")[0]
    assert space.df[minster][0] == 1 and space.idf(ny)[0] == pytest.approx(0.7 * space.idf(minster)[0])
    # the query's pair picks the passage that has it, where words alone tie it with the reversed one
    q = space.encode_sparse(["new york"])
    d = space.encode_sparse(docs)
    scores = np.asarray((d @ q.T).todense()).ravel()
    assert int(np.argmax(scores)) == 0 and scores[0] > scores[4] + 0.05
    words_alone = lexical.LexicalSpace.fit(docs, pair_weight=0)
    assert (words_alone.df[lexical.BUCKETS:] == 0).all()
    d0, q0 = words_alone.encode_sparse(docs), words_alone.encode_sparse(["new york"])
    s0 = np.asarray((d0 @ q0.T).todense()).ravel()
    assert d0.shape == (6, lexical.WIDTH) and s0[0] == pytest.approx(s0[4])
    # document frequencies counted before pairs (an index built before them): words alone
    old = lexical.LexicalSpace(words_alone.df[:lexical.BUCKETS], words_alone.n_docs)
    assert old.pair_weight == 0 and old.df.shape == (lexical.WIDTH,)
    assert np.array_equal(old.encode_sparse(docs).toarray(), d0.toarray())
    with pytest.raises(ValueError, match="--word_pairs"):
        lexical.check_settings(2.0, 4.0, -0.5)


def test_a_higher_idf_power_leans_the_vector_on_the_rarer_words():
    docs = ["rare topic words"] + [f"topic words filler{i}" for i in range(9)] + [f"words alone{i}" for i in range(10)]
    text = ["rare topic words words words"]  # idf: rare 3.35, topic 1.65, words 1.0 (df 1, 10, 20 of 20)
    ids = {w: lexical.bag(w)[0] for w in ("rare", "topic", "words")}
    leans = []
    for power in (0.0, 1.0, 2.0, 3.0):
        v = lexical.LexicalSpace.fit(docs, idf_power=power, pair_weight=0).encode(text)[0]
        s = {w: lexical.sign_vectors(i)[0] for w, i in ids.items()}
        share = {w: float(v @ s[w]) for w in s}
        leans.append(share["rare"] - share["words"])
        if power == 0:  # no idf: (1 + log 3) for the thrice-said common word, 1 for the rare one
            assert share["words"] > share["rare"]
    assert all(a < b for a, b in zip(leans, leans[1:])) and leans[-1] > 0.5


def test_projection_keeps_tfidf_cosines():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(vocab, size=rng.integers(5, 40), p=None)) for _ in range(60)]
    off = ~np.eye(len(texts), dtype=bool)
    # random words: every pair is rare, so with pairs the cosines are smaller beside the same ~1/sqrt(DIMS) noise
    for pair_weight, corr in ((0.0, 0.9), (lexical.PAIR_WEIGHT, 0.6)):
        exact = tfidf_cosines(texts, pair_weight)
        got = lexical.LexicalSpace.fit(texts, pair_weight=pair_weight).encode(texts)
        proj = got @ got.T
        assert np.abs(proj - exact)[off].mean() < 0.03 and np.corrcoef(proj[off], exact[off])[0, 1] > corr


def test_joined_vector_weights_the_lexical_part():
    v = np.array([[3.0, 4.0]], np.float32)
    lex = np.array([[0.0, 1.0, 0.0]], np.float32)
    j = lexical.joined(v, lex, 1.5)
    assert np.allclose(j, [[0.6, 0.8, 0.0, 1.5, 0.0]])
    assert np.allclose(lexical.joined(v, lex, 0), [[0.6, 0.8]]) and np.allclose(lexical.joined(v, None, 2), [[0.6, 0.8]])


def test_index_routes_on_the_model_vector_beside_the_lexical_part(ckpt, tmp_path, capsys):  # noqa: F811
    a = _corpus(tmp_path / "a.jsonl", TEXTS)
    index = kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "i"),
                             "--num_lists", "4", "--batch_size", "7"])  # corpus lists: the lexical part by default
    assert index.meta["lexical"] == lexical.DEFAULT_LEXICAL and index.meta["lexical_docs"] == len(TEXTS)
    assert os.path.isfile(tmp_path / "i" / "lexical_df.npy")
    loaded = kmer_index.Index.load(str(tmp_path / "i"))
    space = lexical.LexicalSpace.fit(TEXTS)  # word statistics of the corpus, counted in batches of 7
    assert np.array_equal(loaded.lexical.df, space.df)
    v = kmer_index.encode_vectors(load_pretrained(str(ckpt)), TEXTS, "passage").astype(np.float16).astype(np.float32)
    want = lexical.joined(kmer_index.routed(v, loaded.center, loaded.transform), space.encode(TEXTS),
                          lexical.DEFAULT_LEXICAL)
    assert loaded.centroids.shape[1] == v.shape[1] + lexical.DIMS
    assert np.array_equal(loaded.codes, (want @ loaded.centroids.T).argmax(1))
    assert np.linalg.norm(loaded.centroids[:, v.shape[1]:], axis=1).min() > 0.1  # the lists hold the words too
    # queries route the same way, from their text, their lexical part at the query scale
    assert loaded.query_scale == lexical.QUERY_SCALE == 12.0 and index.meta["lexical_query_scale"] == 12.0
    as_queries = lexical.joined(kmer_index.routed(v, loaded.center, loaded.transform), space.encode(TEXTS),
                                lexical.DEFAULT_LEXICAL * lexical.QUERY_SCALE)
    projected_order = np.argsort(-(as_queries @ loaded.centroids.T), axis=1, kind="stable")
    # ... but against each list's exact centroid: its passages' mean vector beside their mean words, unprojected
    assert index.meta["word_routing"] == "exact" and os.path.isfile(tmp_path / "i" / "list_words_vals.npy")
    assert index.meta["word_lists_norm"] == "parts" and index.meta["list_words"] == lexical.LIST_WORDS == "max"
    assert index.meta["list_count_power"] == lexical.LIST_COUNT_POWER == 0.25 and "list_word_power" not in index.meta
    r = kmer_index.routed(v, loaded.center, loaded.transform)
    words = exact_tfidf(TEXTS, space)
    order, scores = exact_list_order(loaded.codes, len(loaded.centroids), r, words, r, words, lexical.DEFAULT_LEXICAL,
                                     lexical.DEFAULT_LEXICAL * lexical.QUERY_SCALE)
    assert np.allclose(loaded.list_scores(v, TEXTS, query=True), scores, atol=1e-4)
    assert np.allclose(loaded.list_scores(v[3:4], TEXTS[3:4], query=True), scores[3:4], atol=1e-4)  # one query,
    assert np.allclose(loaded.list_scores(v[3:4], TEXTS[3:4]), exact_list_order(  # the kept transpose reused
        loaded.codes, len(loaded.centroids), r, words, r[3:4], words[3:4], lexical.DEFAULT_LEXICAL,
        lexical.DEFAULT_LEXICAL)[1], atol=1e-4)  # and as a passage (the weight without the query scale)
    assert [h["codes"] for h in loaded.search(v, n_probe=3, texts=TEXTS)] == order[:, :3].tolist()
    # --word_routing projected: the k-means centroids on the projected words, as indexes built before
    kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "pr"),
                     "--num_lists", "4", "--batch_size", "7", "--word_routing", "projected"])
    projected = kmer_index.Index.load(str(tmp_path / "pr"))
    assert projected.word_lists is None and not os.path.isfile(tmp_path / "pr" / "list_words_vals.npy")
    assert np.array_equal(projected.codes, loaded.codes)
    assert [h["codes"] for h in projected.search(v, n_probe=3, texts=TEXTS)] == projected_order[:, :3].tolist()
    with pytest.raises(ValueError):
        loaded.search(v, n_probe=1)
    hits = kmer_index.main(["query", "--index", str(tmp_path / "i"), "--query", TEXTS[3], "--n_probe", "1"])
    assert hits[0]["codes"] == [int(order[3, 0])]
    # an appended corpus keeps the index's word statistics (like its centre and lists)
    b = _corpus(tmp_path / "b.jsonl", ["cheese making in the alps", "volcanoes of iceland"], start=len(TEXTS))
    kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", b, "--index", str(tmp_path / "i"), "--append"])
    grown = kmer_index.Index.load(str(tmp_path / "i"))
    assert np.array_equal(grown.lexical.df, space.df) and grown.meta["lexical_docs"] == len(TEXTS)
    assert grown.query_scale == lexical.QUERY_SCALE
    assert np.array_equal(grown.codes[:len(TEXTS)], loaded.codes)
    # appended passages join the list whose exact centroid is nearest, as routed passages (not queries)
    more = ["cheese making in the alps", "volcanoes of iceland"]
    vb = kmer_index.encode_vectors(load_pretrained(str(ckpt)), more, "passage")
    wb = exact_tfidf(more, space)
    nearest = exact_list_order(loaded.codes, len(loaded.centroids), r, words,
                               kmer_index.routed(vb, loaded.center, loaded.transform), wb, lexical.DEFAULT_LEXICAL,
                               lexical.DEFAULT_LEXICAL)[0][:, 0]
    assert grown.codes[len(TEXTS):].tolist() == nearest.tolist()
    # the lists stay as built, and the index still says how it routes
    assert np.array_equal(grown.word_lists[0], loaded.word_lists[0])
    assert np.array_equal(grown.word_lists[1].toarray(), loaded.word_lists[1].toarray())
    assert grown.meta["word_routing"] == "exact" and grown.meta["word_lists_norm"] == "parts"
    assert grown.meta["list_words"] == "max" and grown.meta["list_count_power"] == 0.25
    # --lexical with the model's codebook, or below 0: one clear line
    for flags in (["--lists", "model", "--lexical", "1"], ["--lexical", "-1"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "m"), *flags])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "--lexical" in err
    meta = json.load(open(tmp_path / "i" / "index.json"))
    assert meta["lexical_dims"] == lexical.DIMS and meta["lexical_idf_power"] == lexical.IDF_POWER
    assert loaded.lexical.idf_power == grown.lexical.idf_power == lexical.IDF_POWER
    assert meta["lexical_pair_weight"] == loaded.lexical.pair_weight == grown.lexical.pair_weight == lexical.PAIR_WEIGHT
    # an index built before the power and the scale were recorded routes as it was built: plain idf, queries
    # weighing their words as passages do, words alone (document frequencies of the words only)
    meta.pop("lexical_idf_power"), meta.pop("lexical_query_scale"), meta.pop("lexical_pair_weight")
    json.dump(meta, open(tmp_path / "i" / "index.json", "w"))
    np.save(tmp_path / "i" / "lexical_df.npy", np.load(tmp_path / "i" / "lexical_df.npy")[:lexical.BUCKETS])
    old = kmer_index.Index.load(str(tmp_path / "i"))
    assert old.lexical.idf_power == 1.0 and old.query_scale == 1.0 and old.lexical.pair_weight == 0.0
    assert (old.lexical.encode_sparse(TEXTS).indices < lexical.BUCKETS).all()
    for flag, bad in (("--idf_power", "-1"), ("--query_scale", "0"), ("--word_pairs", "-1"),
                      ("--list_word_power", "0"), ("--list_word_power", "1.5"), ("--list_count_power", "-0.1"),
                      ("--list_count_power", "2")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            kmer_index.main(["build", "--checkpoint", str(ckpt), "--corpus", a, "--index", str(tmp_path / "p"),
                             flag, bad])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and flag in err


def test_eval_lexical_rows_join_as_the_index_does():
    import eval_filter
    rng = np.random.default_rng(2)
    d = (rng.normal(size=(200, 8)) + 1).astype(np.float32)
    q = (rng.normal(size=(30, 8)) + 1).astype(np.float32)
    ld = rng.normal(size=(200, 16)).astype(np.float32)
    lq = rng.normal(size=(30, 16)).astype(np.float32)
    ld /= np.linalg.norm(ld, axis=1, keepdims=True)
    lq /= np.linalg.norm(lq, axis=1, keepdims=True)
    mean, w = kmer_index.routing_transform(d, whiten=0.5)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    by_hand = eval_filter.ivf_on_teacher(unit(np.concatenate([unit((d - mean) @ w), 2 * ld], 1)),
                                         unit(np.concatenate([unit((q - mean) @ w), 2 * lq], 1)), 8, 0)
    got = eval_filter.kmeans_lists(d, q, 8, 0, center=True, whiten=0.5, lex=(ld, lq), weight=2.0)
    assert all(np.array_equal(a, b) for a, b in zip(got[:2], by_hand[:2]))
    # the queries' part at its own weight (kmer_index.py build --query_scale): same lists, queries joined at 3
    by_hand = eval_filter.ivf_on_teacher(unit(np.concatenate([unit((d - mean) @ w), 2 * ld], 1)),
                                         unit(np.concatenate([unit((q - mean) @ w), 3 * lq], 1)), 8, 0)
    scaled = eval_filter.kmeans_lists(d, q, 8, 0, center=True, whiten=0.5, lex=(ld, lq), weight=2.0, query_weight=3.0)
    assert all(np.array_equal(a, b) for a, b in zip(scaled[:2], by_hand[:2]))
    assert np.array_equal(scaled[0], got[0]) and not np.array_equal(scaled[1], got[1])
    plain = eval_filter.kmeans_lists(d, q, 8, 0, center=True, whiten=0.5)
    assert not np.array_equal(plain[1], got[1])  # the lexical part changes the probe order


def test_eval_exact_word_routing_matches_the_index_by_hand():
    """eval_filter's lexical rows with the exact words: the lists k-means fits on the projected words, then the
    queries' order against each list's exact centroid, as `kmer_index.py build` (default) routes them."""
    import eval_filter
    rng = np.random.default_rng(3)
    vocab = [f"w{i}" for i in range(400)]
    docs = [" ".join(rng.choice(vocab, size=rng.integers(4, 30))) for _ in range(120)]
    queries = [" ".join(rng.choice(vocab, size=rng.integers(2, 6))) for _ in range(25)]
    d = (rng.normal(size=(120, 8)) + 1).astype(np.float32)
    q = (rng.normal(size=(25, 8)) + 1).astype(np.float32)
    space = lexical.LexicalSpace.fit(docs)
    lex = (space.encode(docs), space.encode(queries), space.encode_sparse(docs), space.encode_sparse(queries))
    projected = eval_filter.kmeans_lists(d, q, 8, 0, center=True, whiten=0.5, lex=lex[:2], weight=1.5,
                                         query_weight=2.25)
    exact = eval_filter.kmeans_lists(d, q, 8, 0, center=True, whiten=0.5, lex=lex, weight=1.5, query_weight=2.25)
    assert np.array_equal(exact[0], projected[0])  # the same lists ...
    mean, w = kmer_index.routing_transform(d, whiten=0.5)
    want = exact_list_order(exact[0], 8, (d - mean) @ w, exact_tfidf(docs, space), (q - mean) @ w,
                            exact_tfidf(queries, space), 1.5, 2.25)[0]
    assert np.array_equal(exact[1], want)  # ... picked against their exact centroids
    assert not np.array_equal(exact[1], projected[1])
    # the other poolings of a list's words pick among the same lists, each as by hand, each in its own order:
    # --list_words sum (square roots of the sums), --list_word_power 1 (the mean row), --list_count_power 0 (max alone)
    orders = [exact[1]]
    for pool, word_power, count_power in (("sum", 0.5, 0.25), ("sum", 1.0, 0.25), ("max", 0.5, 0.0)):
        got = eval_filter.kmeans_lists(d, q, 8, 0, center=True, whiten=0.5, lex=lex, weight=1.5, query_weight=2.25,
                                       list_words=pool, list_word_power=word_power, list_count_power=count_power)
        assert np.array_equal(got[0], exact[0])
        assert np.array_equal(got[1], exact_list_order(exact[0], 8, (d - mean) @ w, exact_tfidf(docs, space),
                                                       (q - mean) @ w, exact_tfidf(queries, space), 1.5, 2.25, pool,
                                                       word_power, count_power)[0])
        assert all(not np.array_equal(got[1], o) for o in orders)
        orders.append(got[1])
    # the exact rows are unit TF-IDF and project to what `vectors` gives
    x = lex[2]
    assert np.allclose(np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel()), 1, atol=1e-5)
    assert np.abs(x @ x.T - tfidf_cosines(docs)).max() < 1e-5


def test_a_lists_words_weigh_the_same_however_many_passages_it_holds():
    """A list's exact centroid is its mean vector direction beside `weight` x its mean word direction, each at
    unit norm on its own: a list of passages sharing no words holds its words at the same weight as a list of
    one, so a query's words count as much against large lists (large corpora) as against small ones."""
    rng = np.random.default_rng(5)
    docs = [f"alpha{i} beta{i} gamma{i}" for i in range(40)]
    space = lexical.LexicalSpace.fit(docs)
    vectors = (rng.normal(size=(40, 6)) + 2).astype(np.float32)  # one shared direction, as a topic's passages
    codes = np.array([0] + [1] * 39)  # a list of one passage, a list of 39 with no word in common
    weight = 1.25
    dense, words = lexical.word_lists(codes, 2, vectors, space.encode_sparse(docs), weight)
    total = np.sqrt(1 + weight ** 2)
    assert np.allclose(np.linalg.norm(dense, axis=1), 1 / total, atol=1e-5)
    assert np.allclose(np.sqrt(np.asarray(words.multiply(words).sum(1)).ravel()), weight / total, atol=1e-5)
    # a query naming one passage's words scores its words against either list by its share of that list's words:
    # each term held by one passage, at that passage's weight (count 1), so the list's words are its passages' rows
    # side by side
    q = space.encode_sparse([docs[0], docs[1]])
    word_scores = np.asarray((q @ words.T).todense())
    assert np.isclose(word_scores[0, 0], weight / total, atol=1e-5)
    assert np.isclose(word_scores[1, 1], weight / total / np.sqrt(39), atol=1e-5)
    # --list_words sum, each term's sum at its square root: a passage's row x the row's square root, over the norm
    words = lexical.word_lists(codes, 2, vectors, space.encode_sparse(docs), weight, "sum")[1]
    word_scores = np.asarray((q @ words.T).todense())
    row = q[0].data
    share = (row ** 1.5).sum() / np.sqrt(row.sum())
    assert np.isclose(word_scores[0, 0], weight / total * share, atol=1e-5)
    assert np.isclose(word_scores[1, 1], weight / total * share / np.sqrt(39), atol=1e-5)


def test_a_lists_words_are_their_highest_weights_times_their_counts_and_chunks_combine():
    """Pool "max": each term of a list at its highest weight among the list's passages x (the passages holding it)
    ** the count power; a corpus summed in chunks (as `kmer_index.py build` streams it) gives the same lists as in
    one go, for either pool."""
    docs = ["red apple pie", "red apple", "red wine", "green tea", "green apple tea", "blue sky"]
    space = lexical.LexicalSpace.fit(docs, pair_weight=0.0)
    x = space.encode_sparse(docs)
    codes = np.array([0, 0, 0, 1, 1, 2])
    vectors = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    dense, (top, count) = lexical.list_sums(codes, 3, vectors, x)
    red, apple = (int(space.bag(t)[0][0]) for t in ("red", "apple"))
    rows = x.toarray()
    assert np.isclose(top[0, red], rows[:3, red].max()) and count[0, red] == 3 and count[0, apple] == 2
    assert top[2, red] == 0 and count[1, apple] == 1 and np.isclose(top[1, apple], rows[4, apple])
    assert np.allclose(dense, np.stack([lexical.unit_rows(vectors)[codes == k].sum(0) for k in range(3)]), atol=1e-6)
    _, part = lexical.unit_lists(dense, (top, count), 1.0, count_power=0.25)
    want = top.toarray() * np.where(count.toarray() > 0, count.toarray(), 1) ** 0.25
    want /= np.sqrt(2) * np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(part.toarray(), want, atol=1e-6)
    for pool in lexical.LIST_POOLS:
        whole = lexical.list_sums(codes, 3, vectors, x, pool)
        halves = lexical.add_list_sums(lexical.list_sums(codes[:2], 3, vectors[:2], x[:2], pool),
                                       lexical.list_sums(codes[2:], 3, vectors[2:], x[2:], pool))
        assert np.allclose(whole[0], halves[0], atol=1e-6)
        assert all(np.allclose(a.toarray(), b.toarray(), atol=1e-6) for a, b in zip(whole[1], halves[1]))

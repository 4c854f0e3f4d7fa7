import itertools

import numpy as np
import pytest

from gptjax.data import synthetic as syn

SG_NOUNS = set(syn.NOUNS)
PL_NOUNS = set(syn.NOUNS.values())
SG_VERBS = set(syn.VERBS)
PL_VERBS = set(syn.VERBS.values())
GENDER_OF_PRONOUN = {"she": "f", "her": "f", "he": "m", "him": "m", "his": "m"}


@pytest.fixture(scope="module")
def corpus():
    return syn.documents(2000, seed=0)


def sentences(text):
    return [s.split() for s in text.split(" .") if s.strip()]


def main_agreement(tokens):
    """(subject is plural, main verb is plural) for a sentence whose subject is a lexicon noun."""
    subject = next(t for t in tokens if t in SG_NOUNS or t in PL_NOUNS)
    verb = [t for t in tokens if t in SG_VERBS or t in PL_VERBS][-1]
    return subject in PL_NOUNS, verb in PL_VERBS


def test_document_is_a_pure_function_of_seed_and_index():
    assert syn.document(7, seed=3) == syn.document(7, seed=3)
    assert syn.documents(20, seed=0) != syn.documents(20, seed=1)
    assert len(set(syn.documents(50))) == 50


def test_random_access_matches_sequential_generation():
    docs = syn.documents(30, seed=5)
    assert [syn.document(i, seed=5) for i in (29, 3, 17)] == [docs[29], docs[3], docs[17]]
    assert syn.documents(10, seed=5, start=20) == docs[20:30]
    assert list(itertools.islice(syn.iter_documents(seed=5, start=12), 5)) == docs[12:17]


def test_negative_index_is_rejected():
    with pytest.raises(ValueError):
        syn.document(-1)


def test_text_format_and_length_bounds(corpus):
    for doc in corpus:
        words = doc.split()
        assert syn.MIN_WORDS <= len(words) <= syn.MAX_WORDS
        assert doc == doc.lower() and doc == " ".join(words)
        assert doc.endswith(" .")


def test_vocabulary_is_small(corpus):
    vocab = {w for doc in corpus for w in doc.split()}
    assert 150 <= len(vocab) < 400
    assert {".", ","} <= vocab


def test_corpus_mixes_stories_reviews_and_descriptions(corpus):
    reviews = sum(doc.endswith(syn.VERDICTS) for doc in corpus)
    stories = sum(doc.endswith("goes home and sleeps .") for doc in corpus)
    descriptions = sum(doc.startswith("the ") and " there " in doc for doc in corpus)
    assert min(reviews, stories, descriptions) > 200
    positive = sum(doc.endswith(syn.VERDICTS[1]) for doc in corpus)
    assert 0.35 < positive / reviews < 0.65


@pytest.mark.parametrize("grammatical", [True, False])
def test_agreement_sentence_main_verb(grammatical):
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(500):
        tokens = syn.agreement_sentence(rng, grammatical).split()
        subject_plural, verb_plural = main_agreement(tokens)
        assert (subject_plural == verb_plural) == grammatical, tokens
        kinds.add(next((t for t in tokens if t in ("that", "near", "with", "behind")), None))
    assert {None, "that", "near"} <= kinds  # long-range forms are actually produced


def test_agreement_pair_differs_only_in_main_verb():
    rng = np.random.default_rng(1)
    attracted = 0
    for _ in range(500):
        good, bad = (s.split() for s in syn.agreement_pair(rng))
        diff = [i for i, (a, b) in enumerate(zip(good, bad)) if a != b]
        assert len(good) == len(bad) and len(diff) == 1
        verbs = [i for i, t in enumerate(good) if t in SG_VERBS or t in PL_VERBS]
        assert diff[0] == verbs[-1]
        # Inside an object relative ("that the dogs chase") the embedded verb agrees with its noun.
        if good[1:].count("that") and good[good.index("that") + 1] == "the":
            embedded = verbs[0]
            noun = good[embedded - 1]
            assert (noun in PL_NOUNS) == (good[embedded] in PL_VERBS)
        # Count sentences where the noun right before the main verb has the other number.
        before = good[diff[0] - 1]
        if before in SG_NOUNS | PL_NOUNS:
            attracted += main_agreement(good)[0] != (before in PL_NOUNS)
    assert attracted > 50


def test_agreement_holds_in_documents(corpus):
    nouns, verbs = SG_NOUNS | PL_NOUNS, SG_VERBS | PL_VERBS
    checked = 0
    for doc in corpus:
        for tokens in sentences(doc):
            # Only sentences whose subject is a noun phrase ("the (adj) cat ...") are parsed.
            if tokens[0] in ("the", "a", "an") and set(tokens[1:3]) & nouns and set(tokens) & verbs:
                subject_plural, verb_plural = main_agreement(tokens)
                assert subject_plural == verb_plural, " ".join(tokens)
                checked += 1
    assert checked > 2000


def test_article_matches_next_word(corpus):
    for doc in corpus:
        words = doc.split()
        for article, nxt in zip(words, words[1:]):
            if article in ("a", "an"):
                assert (article == "an") == (nxt[0] in "aeiou"), doc


def test_there_is_and_there_are_agree(corpus):
    for doc in corpus:
        words = doc.split()
        for i, w in enumerate(words[:-4]):
            if w == "there" and words[i + 1] == "is":  # there is a small dog
                assert words[i + 2] in ("a", "an") and words[i + 4] in SG_NOUNS
            elif w == "there" and words[i + 1] == "are":  # there are three dogs
                assert words[i + 3] in PL_NOUNS


def test_pronouns_agree_with_the_protagonist(corpus):
    stories = 0
    for doc in corpus:
        words = doc.split()
        names = [w for w in words if w in syn.NAMES]
        pronouns = [w for w in words if w in GENDER_OF_PRONOUN]
        if not names:
            assert not pronouns  # only stories use third-person pronouns
            continue
        gender = syn.NAMES[names[0]]
        assert all(GENDER_OF_PRONOUN[p] == gender for p in pronouns), doc
        stories += bool(pronouns)
    assert stories > 200
    for gender in ("f", "m"):
        name = next(n for n, g in syn.NAMES.items() if g == gender)
        text = syn.story(np.random.default_rng(2), name=name)
        assert text.split()[0] == name or f"called {name} ." in text
        used = {w for w in text.split() if w in GENDER_OF_PRONOUN}
        assert used and all(GENDER_OF_PRONOUN[p] == gender for p in used)


def review_adjectives(text):
    words = set(text.split())
    return words & set(syn.POSITIVE), words & set(syn.NEGATIVE)


def test_review_verdict_matches_adjectives():
    rng = np.random.default_rng(3)
    for sentiment in (0, 1):
        with_adjectives = 0
        for _ in range(200):
            text = syn.review(rng, sentiment)
            positive, negative = review_adjectives(text)
            agreeing, opposing = (positive, negative) if sentiment else (negative, positive)
            assert text.endswith(syn.VERDICTS[sentiment])
            assert not opposing, text
            if sentiment:
                assert "did not" not in text
            with_adjectives += bool(agreeing)
        # Some sentences carry sentiment by verb alone, but nearly every review also has adjectives.
        assert with_adjectives > 190
    with pytest.raises(ValueError):
        syn.review(rng, 2)


def test_reviews_in_corpus_are_consistent(corpus):
    for doc in corpus:
        positive, negative = review_adjectives(doc)
        if doc.endswith(syn.VERDICTS[1]):
            assert not negative and "did not" not in doc
        elif doc.endswith(syn.VERDICTS[0]):
            assert not positive
        else:
            assert not positive and not negative  # sentiment words appear only in reviews


def test_sentence_labels():
    rng = np.random.default_rng(4)
    labels = []
    for _ in range(500):
        text, label = syn.sentence(rng)
        labels.append(label)
        positive, negative = review_adjectives(text)
        if label:
            assert not negative and "not" not in text.split()
            assert positive or "liked" in text or "enjoyed" in text
        else:
            assert not positive and (negative or "did not" in text)
    assert 150 < sum(labels) < 350
    assert all(syn.sentence(rng, s)[1] == s for s in (0, 1) for _ in range(20))
    with pytest.raises(ValueError):
        syn.sentence(rng, 2)

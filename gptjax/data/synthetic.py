"""A deterministic toy English that a tiny GPT can learn on a CPU, with labelled pieces for tasks.

Lowercase words and punctuation, every token separated by one space:

    once there was a young girl called anna . she has a small dog . the dogs that the cat
    chases sleep . every morning , she walks to the park with her dog . ...

A lexicon of a few hundred word forms lets a ~512-piece BPE give most words one piece, so a 4-layer
model spends its capacity on structure rather than spelling. The structure makes falling loss mean
more than learned word frequencies, and the same generators later build GLUE-style tasks:

* Number agreement, also across a relative clause or prepositional phrase whose noun usually has the
  other number ("the cat that the dogs chase sleeps ."), so copying the nearest noun is wrong.
  `agreement_sentence` also makes deliberately violated sentences (acceptability, as in CoLA).
* Coreference: a story names its protagonist first and every later he/she/him/her/his refers to
  them, a dependency across sentences. Other characters are only ever named.
* Sentiment: all evaluative sentences of a review share one sentiment and its closing verdict
  ("overall , i loved it ." / "overall , i hated it .") agrees, so predicting the verdict needs the
  whole document (as in SST-2). `sentence` yields single labelled sentences.
* Smaller regularities: "a"/"an", "there is a"/"there are three", a "watched" work having actors and
  a "read" one chapters, entities and places referred back to with the same noun and number.

Document `i` of seed `s` comes from `np.random.default_rng([s, i])` alone, so a sharded loader can
produce any document directly and every host agrees on the corpus. Length, counted in whitespace
separated tokens (punctuation included), lies in [MIN_WORDS, MAX_WORDS].
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np

MIN_WORDS, MAX_WORDS = 40, 200

# singular -> plural. Irregular plurals keep "plural = ends in s" from being the whole rule.
NOUNS: dict[str, str] = {
    "cat": "cats", "dog": "dogs", "bird": "birds", "horse": "horses", "fox": "foxes",
    "mouse": "mice", "rabbit": "rabbits", "owl": "owls", "elephant": "elephants",
    "teacher": "teachers", "king": "kings", "farmer": "farmers", "doctor": "doctors",
    "student": "students", "child": "children", "girl": "girls", "boy": "boys", "woman": "women",
    "man": "men", "baker": "bakers",
}
# Third person singular -> plural (the bare form).
TRANSITIVE_VERBS: dict[str, str] = {
    "chases": "chase", "sees": "see", "likes": "like", "helps": "help", "follows": "follow",
    "finds": "find", "watches": "watch", "visits": "visit", "meets": "meet", "calls": "call",
    "feeds": "feed",
}
INTRANSITIVE_VERBS: dict[str, str] = {
    "sleeps": "sleep", "runs": "run", "sings": "sing", "smiles": "smile", "waits": "wait",
    "laughs": "laugh", "walks": "walk", "jumps": "jump", "plays": "play",
}
# Every verb form the generator emits, singular -> plural.
VERBS: dict[str, str] = {**TRANSITIVE_VERBS, **INTRANSITIVE_VERBS,
                         "is": "are", "has": "have", "lives": "live", "goes": "go"}
NAMES: dict[str, str] = {
    **dict.fromkeys(("anna", "mary", "lucy", "emma", "sara", "lily", "kate", "ella"), "f"),
    **dict.fromkeys(("tom", "jack", "sam", "ben", "paul", "max", "leo", "nick"), "m"),
}
# gender -> (subject, object, possessive)
PRONOUNS: dict[str, tuple[str, str, str]] = {"f": ("she", "her", "her"), "m": ("he", "him", "his")}
POSITIVE = ("wonderful", "good", "great", "delightful", "brilliant", "lovely", "excellent",
            "superb", "amazing", "charming", "beautiful", "fantastic")
NEGATIVE = ("terrible", "awful", "boring", "dull", "bad", "dreadful", "poor", "weak", "tedious",
            "ugly", "horrible", "annoying")
NEUTRAL = ("red", "small", "old", "big", "young", "green", "little", "tall", "quiet", "brown",
           "white", "long")
PLACES = ("park", "garden", "river", "forest", "school", "market", "town", "field", "lake", "farm")
VERDICTS = ("overall , i hated it .", "overall , i loved it .")  # indexed by sentiment

_PETS = ("cat", "dog", "bird", "horse", "rabbit", "mouse")
_FILM = (("acting", "music", "plot", "ending", "story", "dialogue", "cast"),
         ("actors", "songs", "scenes", "jokes", "costumes"))
_BOOK = (("plot", "ending", "story", "writing", "style", "cover"),
         ("characters", "chapters", "pictures", "jokes"))
# work -> (how it is consumed, (singular aspects, plural aspects))
_WORKS = {"movie": ("watched", _FILM), "film": ("watched", _FILM), "show": ("watched", _FILM),
          "book": ("read", _BOOK), "novel": ("read", _BOOK)}
_WHEN = ("last week", "last night", "yesterday", "on sunday", "with my friends")
_ADVERBS = ("very", "really", "quite", "truly")
_PREPS = ("near", "with", "behind")
_NUMBERS = ("two", "three", "four", "five", "many")
_MOODS = ("happy", "tired", "hungry", "sad")
_PLACE_ADJ = ("big", "small", "old", "quiet", "green")
_SG, _PL = tuple(NOUNS), tuple(NOUNS.values())
_VT, _VI = tuple(TRANSITIVE_VERBS), tuple(INTRANSITIVE_VERBS)


def _pick(rng: np.random.Generator, seq: Sequence):
    # rng.random() is several times cheaper than rng.integers() or rng.choice() for one scalar,
    # and indexing hands back the original str rather than a numpy string.
    return seq[int(rng.random() * len(seq))]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _noun(rng: np.random.Generator, plural: bool) -> str:
    return _pick(rng, _PL if plural else _SG)


def _verb(rng: np.random.Generator, verbs: dict[str, str], plural: bool) -> str:
    sg = _pick(rng, tuple(verbs))
    return verbs[sg] if plural else sg


def _np(rng: np.random.Generator, plural: bool) -> list[str]:
    adj = [_pick(rng, NEUTRAL)] if rng.random() < 0.3 else []
    return ["the", *adj, _noun(rng, plural)]


def _agreement_frame(rng: np.random.Generator):
    """A sentence with its main verb left open: (before, (singular, plural), after, plural).

    Relative clauses attach only to the subject, so the main verb is always the sentence's last
    verb form; tests and task builders rely on that to find it.
    """
    plural = rng.random() < 0.5
    # The intervening noun usually has the other number, so agreeing with the nearest noun fails.
    other = (not plural) if rng.random() < 0.7 else plural
    before = _np(rng, plural)
    form = int(rng.random() * 4)
    if form == 1:    # object relative: the cat that the dogs chase ...
        before += ["that", *_np(rng, other), _verb(rng, TRANSITIVE_VERBS, other)]
    elif form == 2:  # subject relative: the cat that chases the dogs ...
        before += ["that", _verb(rng, TRANSITIVE_VERBS, plural), *_np(rng, other)]
    elif form == 3:  # prepositional attractor: the cat near the dogs ...
        before += [_pick(rng, _PREPS), *_np(rng, other)]
    kind = rng.random()
    if kind < 0.4:
        verbs, after = INTRANSITIVE_VERBS, []
    elif kind < 0.8:
        verbs, after = TRANSITIVE_VERBS, _np(rng, rng.random() < 0.5)
    else:
        verbs, after = {"is": "are"}, [_pick(rng, NEUTRAL)]
    sg = _pick(rng, tuple(verbs))
    return before, (sg, verbs[sg]), [*after, "."], plural


def agreement_pair(rng: np.random.Generator) -> tuple[str, str]:
    """(grammatical, ungrammatical) versions of one sentence, differing only in the main verb."""
    before, (sg, pl), after, plural = _agreement_frame(rng)
    return tuple(" ".join([*before, v, *after]) for v in ((pl, sg) if plural else (sg, pl)))


def agreement_sentence(rng: np.random.Generator, grammatical: bool) -> str:
    """A sentence whose main verb agrees with its subject or, if not grammatical, deliberately not.

    Verbs inside relative clauses always agree, so an error shows only when the main verb is linked
    to the head noun.
    """
    return agreement_pair(rng)[0 if grammatical else 1]


def _evaluative(rng: np.random.Generator, sentiment: int, work: str) -> str:
    singular, plural = _WORKS[work][1]
    adj = _pick(rng, POSITIVE if sentiment else NEGATIVE)
    adj = f"{_pick(rng, _ADVERBS)} {adj}" if rng.random() < 0.3 else adj
    form = int(rng.random() * 6)
    if form == 0:
        return f"the {_pick(rng, singular)} is {adj} ."
    if form == 1:
        return f"the {_pick(rng, plural)} are {adj} ."
    if form == 2:
        return f"i found the {_pick(rng, singular + plural)} {adj} ."
    if form == 3:
        return f"it is {_a(adj)} {work} ."
    if form == 4:
        # Two singular aspects joined by "and" take a plural verb.
        first = _pick(rng, singular)
        second = _pick(rng, tuple(a for a in singular if a != first))
        return f"the {first} and the {second} are {adj} ."
    # Sentiment carried by a verb, and for negative reviews by negation, rather than an adjective.
    verbs = ("really liked", "enjoyed") if sentiment else ("did not like", "did not enjoy")
    verb = _pick(rng, verbs)
    return f"i {verb} the {_pick(rng, singular + plural)} ."


def sentence(rng: np.random.Generator, sentiment: int | None = None) -> tuple[str, int]:
    """One evaluative review sentence and its label (0 negative, 1 positive; random if None)."""
    label = int(rng.random() < 0.5) if sentiment is None else int(sentiment)
    if label not in (0, 1):
        raise ValueError(f"sentiment must be 0, 1 or None, got {sentiment!r}")
    return _evaluative(rng, label, _pick(rng, tuple(_WORKS))), label


def _assemble(rng: np.random.Generator, head: list[str], body: Callable[[], str],
              tail: list[str]) -> str:
    count = sum(len(s.split()) for s in head + tail)
    # Aim 40 short of MAX_WORDS so the last sentence nearly always fits; the check enforces it.
    target = int(rng.integers(MIN_WORDS, MAX_WORDS - 40, endpoint=True))
    out = list(head)
    while count < target:
        s = body()
        if count + len(s.split()) > MAX_WORDS:
            break
        out.append(s)
        count += len(s.split())
    return " ".join(out + tail)


def review(rng: np.random.Generator, sentiment: int) -> str:
    """A review whose evaluative sentences all carry `sentiment`, as does its closing verdict."""
    if sentiment not in (0, 1):
        raise ValueError(f"sentiment must be 0 or 1, got {sentiment!r}")
    sentiment = int(sentiment)
    work = _pick(rng, tuple(_WORKS))
    verb = _WORKS[work][0]

    # Non-evaluative sentences, some shaped like evaluative ones ("it is a long movie"), so the
    # label has to come from the evaluative words rather than the sentence template.
    def neutral() -> str:
        form = int(rng.random() * 3)
        if form == 0:
            who = [_a(f"{_pick(rng, NEUTRAL)} {_noun(rng, False)}") for _ in range(2)]
            return f"the {work} is about {who[0]} and {who[1]} ."
        if form == 1:
            return f"it is {_a(_pick(rng, ('long', 'short')))} {work} ."
        return f"i {verb} it {_pick(rng, _WHEN)} ."

    def body() -> str:
        return _evaluative(rng, sentiment, work) if rng.random() < 0.75 else neutral()

    head = [f"i {verb} the {work} {_pick(rng, _WHEN)} .", _evaluative(rng, sentiment, work)]
    tail = [VERDICTS[sentiment]]
    if rng.random() < 0.4:
        tail.insert(0, "i would recommend it ." if sentiment else "i would not recommend it .")
    return _assemble(rng, head, body, tail)


def story(rng: np.random.Generator, name: str | None = None) -> str:
    """A story about one named protagonist; every third-person pronoun in it refers to them."""
    name = name or _pick(rng, tuple(NAMES))
    if name not in NAMES:
        raise ValueError(f"unknown name {name!r}; choose one of {sorted(NAMES)}")
    he, him, his = PRONOUNS[NAMES[name]]
    noun = _pick(rng, ("girl", "woman") if NAMES[name] == "f" else ("boy", "man"))
    person = _a(f"{_pick(rng, NEUTRAL)} {noun}")
    friend = _pick(rng, tuple(n for n in NAMES if n != name))
    pet, place = _pick(rng, _PETS), _pick(rng, PLACES)
    intro = _pick(rng, (f"once there was {person} called {name} .", f"{name} is {person} .",
                        f"this is a story about {person} called {name} ."))
    head = [intro, f"{he} lives near the {place} .", f"{he} has {_a(_pick(rng, NEUTRAL))} {pet} ."]

    def body() -> str:
        n = rng.random() < 0.5  # number of a noun the sentence introduces
        forms = (
            lambda: f"every morning , {he} walks to the {place} with {his} {pet} .",
            lambda: (f"one day , {he} {_pick(rng, _VT)} {_a(_pick(rng, NEUTRAL))} "
                     f"{_noun(rng, False)} near the {_pick(rng, PLACES)} ."),
            lambda: f"{his} {pet} {_pick(rng, _VI)} .",
            lambda: (f"the {_noun(rng, n)} that {he} {_pick(rng, _VT)} "
                     f"{_verb(rng, INTRANSITIVE_VERBS, n)} ."),
            lambda: f"the {_noun(rng, n)} in the {place} {_verb(rng, TRANSITIVE_VERBS, n)} {him} .",
            lambda: f"{name} and {friend} {_verb(rng, INTRANSITIVE_VERBS, True)} together .",
            lambda: f"{friend} {_pick(rng, _VT)} {his} {pet} .",
            lambda: f"{he} is {_pick(rng, _MOODS)} .",
            lambda: agreement_sentence(rng, True),
        )
        return _pick(rng, forms)()

    return _assemble(rng, head, body, [f"at night , {name} goes home and sleeps ."])


def description(rng: np.random.Generator) -> str:
    """A scene: entities come in with "there is/are" and are referred back to in the same number."""
    place = _pick(rng, PLACES)
    entities: list[tuple[str, bool]] = []

    def introduce() -> str:
        plural = rng.random() < 0.5
        entities.append((noun := _noun(rng, plural), plural))
        some = f"are {_pick(rng, _NUMBERS)}" if plural else f"is {_a(_pick(rng, NEUTRAL))}"
        return f"there {some} {noun} in the {place} ."

    def body() -> str:
        kind = rng.random()
        if kind < 0.3 or not entities:
            return introduce()
        noun, plural = _pick(rng, entities)
        if kind < 0.5:
            return f"the {noun} {_verb(rng, INTRANSITIVE_VERBS, plural)} ."
        if kind < 0.7:
            other = _pick(rng, entities)[0]
            return f"the {noun} {_verb(rng, TRANSITIVE_VERBS, plural)} the {other} ."
        return agreement_sentence(rng, True)

    head = [f"the {place} is {_pick(rng, _PLACE_ADJ)} .", introduce()]
    return _assemble(rng, head, body, [f"that is the {place} ."])


def document(index: int, seed: int = 0) -> str:
    """Document `index` of corpus `seed`, a pure function of the two (O(1), no earlier documents).

    About 40% are stories, 40% reviews (half of them positive) and 20% descriptions.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index])
    u = rng.random()
    if u < 0.4:
        return story(rng)
    if u < 0.8:
        return review(rng, int(rng.random() < 0.5))
    return description(rng)


def documents(n: int, seed: int = 0, start: int = 0) -> list[str]:
    """Documents start .. start + n - 1 of corpus `seed`."""
    return [document(i, seed) for i in range(start, start + n)]


def iter_documents(seed: int = 0, start: int = 0) -> Iterator[str]:
    """Every document of corpus `seed` from `start` on, without end."""
    return (document(i, seed) for i in itertools.count(start))

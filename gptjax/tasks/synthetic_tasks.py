"""GLUE-style tasks of every type built from the synthetic toy English, for demos and tests.

Each label follows from how its example was built, so a model that learns the task must have
learned the construction (sentiment, number agreement, ...), not a surface cue such as which
template the text came from:

* synthetic_sentiment (classification, SST-2-like): one review sentence, negative or positive.
* synthetic_acceptability (classification, CoLA-like): main verb agrees with its subject or not.
* synthetic_entailment (pair, MNLI-like): the hypothesis is always a verdict ("overall , i loved
  it ."); it follows from an evaluative premise of the same sentiment, is contradicted by one of the
  other sentiment, and is neutral after a premise that evaluates nothing.
* synthetic_paraphrase (similarity, MRPC-like): two review sentences are "equivalent" when they
  express the same opinion, a relation with no direction.
* synthetic_relatedness (regression, STS-B-like): two five-sentence reviews scored
  5 - |positives(a) - positives(b)|, from 0 (opposite) to 5 (same balance of opinion).
* synthetic_choice (multiple_choice, story-cloze-like): a story, then CHOICES continuations that
  cross he/she with a verb that agrees or not ("she sleeps ." / "she sleep ." / "he sleeps ." /
  "he sleep ."); only the protagonist's pronoun with the agreeing verb is right. Each candidate is
  the only one of its (pronoun, agreement) cell, so none stands out without the story: agreement
  rules out two, and only the protagonist's gender, set in the story, separates the other two.

* synthetic_coreference (pair, RTE-like): a story, then one sentence about "he" or "she" with an
  agreeing verb; it is entailed when the pronoun is the protagonist's, so only the story's
  protagonist (named once, at the start, with a gendered noun) decides.
* synthetic_coherence (similarity): the same story and sentence read as a symmetric relation:
  "same_person" when both are about the protagonist.

Example i of a split is a pure function of (seed, task, split, i), so any subset can be produced
directly and every host agrees. Test splits keep their labels: this data is not scored by a server.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gptjax.data import synthetic as syn
from gptjax.errors import UserError
from gptjax.tasks.example import Example
from gptjax.tasks.task import Task

SIZES = {"train": 2000, "validation": 200, "test": 200}
REVIEW_SENTENCES = 5  # sentences per text of synthetic_relatedness, and so its top score
CHOICES = 4  # candidate answers per synthetic_choice example: one per (pronoun, agreement) cell
_SPLITS = tuple(SIZES)


def _sentiment(rng: np.random.Generator):
    text, label = syn.sentence(rng, int(rng.random() < 0.5))
    return (text,), label


def _acceptability(rng: np.random.Generator):
    label = int(rng.random() < 0.5)
    return (syn.agreement_sentence(rng, bool(label)),), label


def _entailment(rng: np.random.Generator):
    label = int(rng.random() * 3)  # entailment, neutral, contradiction
    verdict = int(rng.random() < 0.5)
    if label == 1:
        premise = syn.agreement_sentence(rng, True)
    else:
        premise, _ = syn.sentence(rng, verdict if label == 0 else 1 - verdict)
    return (premise, syn.VERDICTS[verdict]), label


def _paraphrase(rng: np.random.Generator):
    label = int(rng.random() < 0.5)
    first = int(rng.random() < 0.5)
    second = first if label else 1 - first
    return (syn.sentence(rng, first)[0], syn.sentence(rng, second)[0]), label


def _opinions(rng: np.random.Generator, positives: int) -> str:
    order = rng.permutation([1] * positives + [0] * (REVIEW_SENTENCES - positives))
    return " ".join(syn.sentence(rng, int(s))[0] for s in order)


def _relatedness(rng: np.random.Generator):
    # Draw the score first so the scores are uniform over 0..5, then a pair of counts that gives it.
    score = int(rng.random() * (REVIEW_SENTENCES + 1))
    gap = REVIEW_SENTENCES - score
    counts = [(a, b) for a in range(REVIEW_SENTENCES + 1) for b in range(REVIEW_SENTENCES + 1)
              if abs(a - b) == gap]
    a, b = counts[int(rng.random() * len(counts))]
    return (_opinions(rng, a), _opinions(rng, b)), float(score)


# One frame for all candidates of an example, so they differ only in the pronoun and verb form.
_CONTINUATIONS = ("the next day , {} {} .", "{} {} again .", "then {} {} .")


def _choice(rng: np.random.Generator):
    names, verbs = tuple(syn.NAMES), tuple(syn.INTRANSITIVE_VERBS)
    name = names[int(rng.random() * len(names))]
    context = syn.story(rng, name)
    right = syn.PRONOUNS[syn.NAMES[name]][0]
    wrong = next(forms[0] for gender, forms in syn.PRONOUNS.items() if gender != syn.NAMES[name])
    singular = verbs[int(rng.random() * len(verbs))]
    plural = syn.INTRANSITIVE_VERBS[singular]
    frame = _CONTINUATIONS[int(rng.random() * len(_CONTINUATIONS))]
    distractors = [(right, plural), (wrong, singular), (wrong, plural)]
    answers = [frame.format(*distractors[i]) for i in rng.permutation(len(distractors))]
    label = int(rng.random() * CHOICES)
    answers.insert(label, frame.format(right, singular))
    return (context, *answers), label


def _pronoun_sentence(rng: np.random.Generator):
    """(a story, a sentence about he or she with an agreeing verb, whether it is the protagonist)."""
    names = tuple(syn.NAMES)
    name = names[int(rng.random() * len(names))]
    gender = syn.NAMES[name]
    fits = int(rng.random() < 0.5)
    pronoun = syn.PRONOUNS[gender if fits else ("m" if gender == "f" else "f")][0]
    verbs = tuple(syn.INTRANSITIVE_VERBS)
    frame = _CONTINUATIONS[int(rng.random() * len(_CONTINUATIONS))]
    return syn.story(rng, name), frame.format(pronoun, verbs[int(rng.random() * len(verbs))]), fits


def _coreference(rng: np.random.Generator):
    story, sentence, fits = _pronoun_sentence(rng)
    return (story, sentence), 1 - fits  # 0 = entailment


def _coherence(rng: np.random.Generator):
    story, sentence, fits = _pronoun_sentence(rng)
    return (story, sentence), fits  # 1 = the two texts are about the same person


def _task(name, type_, fields, labels, metrics, prediction_format="label_id", **kw) -> Task:
    return Task(f"synthetic_{name}", type_, fields, labels, metrics, _SPLITS,
                prediction_format=prediction_format, **kw)


SYNTHETIC_TASKS: dict[str, Task] = {t.name: t for t in (
    _task("sentiment", "classification", ("sentence",), ("negative", "positive"), ("accuracy",)),
    _task("acceptability", "classification", ("sentence",), ("unacceptable", "acceptable"),
          ("matthews", "accuracy")),
    _task("entailment", "pair", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
          ("accuracy",), "label_name"),
    _task("paraphrase", "similarity", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
          ("f1", "accuracy")),
    _task("relatedness", "regression", ("sentence1", "sentence2"), (), ("pearson", "spearman"), "float",
          score_range=(0.0, float(REVIEW_SENTENCES))),
    # Example.texts is (context, answer_0, ..., answer_3); the label indexes the correct answer.
    _task("choice", "multiple_choice", ("context", *(f"answer_{i}" for i in range(CHOICES))),
          tuple(f"answer_{i}" for i in range(CHOICES)), ("accuracy",)),
    _task("coreference", "pair", ("story", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
          "label_name"),
    _task("coherence", "similarity", ("story", "sentence"), ("different_person", "same_person"),
          ("f1", "accuracy")),
)}

# The position of a task or split in these tuples seeds its examples: append, never reorder.
_BUILDERS: dict[str, Callable[[np.random.Generator], tuple[tuple[str, ...], int | float]]] = {
    "synthetic_sentiment": _sentiment,
    "synthetic_acceptability": _acceptability,
    "synthetic_entailment": _entailment,
    "synthetic_paraphrase": _paraphrase,
    "synthetic_relatedness": _relatedness,
    "synthetic_choice": _choice,
    "synthetic_coreference": _coreference,
    "synthetic_coherence": _coherence,
}
_TASK_IDS = {name: i for i, name in enumerate(_BUILDERS)}
_SPLIT_IDS = {name: i for i, name in enumerate(_SPLITS)}


def synthetic_example(task: str | Task, split: str, index: int, seed: int = 0) -> Example:
    """Example `index` of a synthetic task's split; its idx is `index`."""
    name = task.name if isinstance(task, Task) else task
    if name not in _BUILDERS:
        raise UserError(f"unknown synthetic task '{name}'; synthetic tasks: {', '.join(_BUILDERS)}")
    SYNTHETIC_TASKS[name].check_split(split)
    if index < 0 or seed < 0:
        raise UserError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, _TASK_IDS[name], _SPLIT_IDS[split], index])
    texts, label = _BUILDERS[name](rng)
    return Example(index, texts, label)


def synthetic_split(task: str | Task, split: str, seed: int = 0, size: int | None = None) -> list[Example]:
    """The first `size` examples (default SIZES[split]) of a synthetic task's split."""
    synthetic_example(task, split, 0, seed)  # checks the task, split and seed before any work
    size = SIZES[split] if size is None else size
    if size < 0:
        raise UserError(f"size must be non-negative, got {size}")
    return [synthetic_example(task, split, i, seed) for i in range(size)]

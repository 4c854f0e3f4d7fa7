import json
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest

from gptjax.data import synthetic as syn
from gptjax.errors import UserError
from gptjax.tasks import (GLUE_TASKS, SUBMISSION_HEADER, SYNTHETIC_TASKS, TASKS, Example, get_task,
                          read_jsonl_split, read_tfds_split, read_tsv_split, synthetic_example,
                          synthetic_split)
from gptjax.tasks.glue_tfds import _example as tfds_record_to_example
from gptjax.tasks.glue_tfds import _records as tfds_records
from gptjax.tasks.task import Task

SPLITS = ("train", "validation", "test")
MNLI_SPLITS = ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")
NLI3 = ("entailment", "neutral", "contradiction")

# name: (type, text fields, label names, metrics, {split: submission file}, splits, prediction format)
PAPER_FACTS = {
    "cola": ("classification", ("sentence",), ("unacceptable", "acceptable"), ("matthews",),
             {"test": "CoLA.tsv"}, SPLITS, "label_id"),
    "sst2": ("classification", ("sentence",), ("negative", "positive"), ("accuracy",),
             {"test": "SST-2.tsv"}, SPLITS, "label_id"),
    "mrpc": ("similarity", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"),
             {"test": "MRPC.tsv"}, SPLITS, "label_id"),
    "qqp": ("similarity", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"),
            {"test": "QQP.tsv"}, SPLITS, "label_id"),
    "stsb": ("regression", ("sentence1", "sentence2"), (), ("pearson", "spearman"),
             {"test": "STS-B.tsv"}, SPLITS, "float"),
    "mnli": ("pair", ("premise", "hypothesis"), NLI3, ("accuracy",),
             {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"}, MNLI_SPLITS, "label_name"),
    "qnli": ("pair", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
             {"test": "QNLI.tsv"}, SPLITS, "label_name"),
    "rte": ("pair", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",),
            {"test": "RTE.tsv"}, SPLITS, "label_name"),
    "wnli": ("pair", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",),
             {"test": "WNLI.tsv"}, SPLITS, "label_id"),
    "ax": ("pair", ("premise", "hypothesis"), NLI3, ("matthews",), {"test": "AX.tsv"}, ("test",), "label_name"),
}


@pytest.mark.parametrize("name", sorted(PAPER_FACTS))
def test_registry_matches_paper_facts(name):
    type_, fields, labels, metrics, submissions, splits, fmt = PAPER_FACTS[name]
    task = get_task(name)
    assert (task.name, task.type, task.text_fields, task.label_names) == (name, type_, fields, labels)
    assert (task.metrics, dict(task.submission_files), task.splits) == (metrics, submissions, splits)
    assert (task.tfds_name, task.prediction_format) == (f"glue/{name}", fmt)
    assert task.num_labels == (len(labels) or 1)
    # The paper's heads: one output per class; a similarity adds both orders' states; a score is one output.
    assert (task.head_outputs, task.combine) == {"classification": (len(labels), "single"),
                                                 "pair": (len(labels), "single"),
                                                 "similarity": (len(labels), "sum"),
                                                 "regression": (1, "sum")}[type_]
    assert {f.split for f in task.tsv_files} == set(splits)
    assert dict(task.num_examples).keys() == set(splits)
    for split, file in submissions.items():
        assert task.submission_file(split) == file


def test_registry_lookup_and_submission_formats():
    assert set(GLUE_TASKS) == set(PAPER_FACTS) and set(TASKS) == set(GLUE_TASKS) | set(SYNTHETIC_TASKS)
    assert get_task("SST-2") is get_task("glue/sst2") is get_task("sst2")
    assert get_task("STS-B").name == "stsb"
    with pytest.raises(UserError, match="unknown task 'glu'.*cola, sst2, mrpc.*ax"):
        get_task("glu")
    with pytest.raises(UserError, match="validation_matched"):
        get_task("mnli").check_split("validation")
    with pytest.raises(UserError, match="no split 'dev'.*'validation'"):
        get_task("rte").check_split("dev")
    assert SUBMISSION_HEADER == "index\tprediction"
    assert [get_task("mnli").format_prediction(i) for i in range(3)] == list(NLI3)
    assert get_task("ax").format_prediction(1) == "neutral"
    assert get_task("qnli").format_prediction(1) == get_task("rte").format_prediction(1) == "not_entailment"
    assert [get_task(n).format_prediction(1) for n in ("cola", "sst2", "mrpc", "qqp", "wnli")] == ["1"] * 5
    stsb = get_task("stsb")
    assert [stsb.format_prediction(x) for x in (5.7, -0.2, 3.14159)] == ["5.000", "0.000", "3.142"]
    assert stsb.parse_label("3.800") == 3.8 and get_task("mnli").parse_label("neutral") == 1
    assert get_task("mnli").parse_label(np.int64(2)) == 2 and get_task("cola").parse_label(" 1") == 1
    for bad in (1.0, True, "-1", "one"):
        with pytest.raises(ValueError):
            get_task("cola").parse_label(bad)
    with pytest.raises(ValueError, match="0 \\(entailment\\), 1 \\(not_entailment\\)"):
        get_task("rte").parse_label("2")


# ---------------------------------------------------------------- official GLUE folder (TSV)

T = "\t".join
MNLI_HEAD = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def mnli_row(i, s1, s2, *labels):
    return T([str(i), "31193", f"{i}n", "government", f"( {s1} )", f"( {s2} )", f"(ROOT {s1})",
              f"(ROOT {s2})", s1, s2, *labels])


# A quote left open, as in real GLUE rows, which csv's quote handling would run across lines.
OPEN_QUOTE = 'He said "the rocks were clear.'
GLUE_FILES = {
    "CoLA/train.tsv": [T(["gj04", "1", "", "Our friends won't buy this analysis."]),
                       T(["gj04", "0", "*", 'They drank the pub "dry" dry.']),
                       T(["cj99", "1", "", OPEN_QUOTE])],
    "CoLA/dev.tsv": [T(["gj04", "1", "", "The sailors rode the breeze clear of the rocks."]),
                     T(["gj04", "0", "*", 'The "more" you eat.'])],
    "CoLA/test.tsv": ["index\tsentence", T(["0", "Bill whistled past the house."]),
                      T(["1", 'A "quoted" test sentence.'])],
    "SST-2/train.tsv": ["sentence\tlabel", T(["hide new secretions from the parental units ", "0"]),
                        T(['the " greatest " film ', "1"])],
    "SST-2/dev.tsv": ["sentence\tlabel", T(["it 's a charming and often affecting journey . ", "1"])],
    "SST-2/test.tsv": ["index\tsentence", T(["0", "uneasy mishmash of styles and genres ."]),
                       T(["1", 'a " fresh " look .'])],
    "MRPC/train.tsv": ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                       T(["1", "702876", "702977", 'Amrozi called him " the witness " .',
                          'Referring to him as only " the witness " , Amrozi accused him .']),
                       T(["0", "2108705", "2108831", "Yucaipa owned Dominick 's .", "Yucaipa bought it ."])],
    "MRPC/dev.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                     T(["1", "1355540", "1355592", "He is here .", "He 's here ."])],
    "MRPC/test.tsv": ["index\t#1 ID\t#2 ID\t#1 String\t#2 String",
                      T(["0", "1089874", "1089925", "PCCW 's chief .", "Lim , the chief ."])],
    "QQP/train.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                      T(["133273", "213221", "213222", 'What does "jlpt" mean?', "Which level is enough?", "0"]),
                      T(["402555", "536040", "536041", "How do I get rich?", "How can I get rich?", "1"])],
    "QQP/dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                    T(["201359", "303345", "303346", "Why are people lazy?", "Why do people stay lazy?", "1"])],
    "QQP/test.tsv": ["id\tquestion1\tquestion2", T(["0", "Would Trump win?", 'Is "Trump" winning?']),
                     T(["1", "What is ML?", "What is machine learning?"])],
    "STS-B/train.tsv": ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                        T(["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none",
                           "A plane is taking off.", 'An "air plane" is taking off.', "5.000"]),
                        T(["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none",
                           "A man plays a flute.", "A man is eating.", "0.500"])],
    "STS-B/dev.tsv": ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                      T(["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none",
                         "A man with a hat.", "A man wearing a hat.", "3.800"])],
    "STS-B/test.tsv": ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2",
                       T(["0", "main-captions", "MSRvid", "2012test", "0024", "none", "none",
                          "A girl is styling her hair.", "A girl is brushing her hair."])],
    "MNLI/train.tsv": [T([*MNLI_HEAD, "label1", "gold_label"]),
                       mnli_row(0, "Conceptually cream skimming has two dimensions.",
                                "Product and geography are what make it work.", "neutral", "neutral"),
                       mnli_row(1, 'You know "during the season".', "You lose them.",
                                "entailment", "entailment")],
    "MNLI/dev_matched.tsv": [T([*MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label"]),
                             mnli_row(0, "The new rights are nice.", "Everyone hates them.",
                                      "neutral", "contradiction", "contradiction", "contradiction",
                                      "contradiction", "contradiction")],
    "MNLI/dev_mismatched.tsv": [T([*MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label"]),
                                mnli_row(0, 'Your "gift" is appreciated.', "Hundreds gave.", "entailment",
                                         "neutral", "neutral", "neutral", "neutral", "neutral"),
                                mnli_row(1, "A b.", "A c.", "entailment", "entailment", "entailment",
                                         "entailment", "entailment", "entailment")],
    "MNLI/test_matched.tsv": [T(MNLI_HEAD), mnli_row(0, "Hierbas is a liqueur.", "It is a drink.")],
    "MNLI/test_mismatched.tsv": [T(MNLI_HEAD), mnli_row(0, 'What "had" happened?', "Nothing happened."),
                                 mnli_row(1, "One.", "Two.")],
    "QNLI/train.tsv": ["index\tquestion\tsentence\tlabel",
                       T(["0", "When did it start?", 'It started in "1948".', "not_entailment"]),
                       T(["1", "Who wrote it?", "Orwell wrote it.", "entailment"])],
    "QNLI/dev.tsv": ["index\tquestion\tsentence\tlabel", T(["0", "What is it?", "It is a cat.", "entailment"])],
    "QNLI/test.tsv": ["index\tquestion\tsentence", T(["0", "Where?", 'In "Paris".'])],
    "RTE/train.tsv": ["index\tsentence1\tsentence2\tlabel",
                      T(["0", 'No "weapons" were found.', "Weapons were found.", "not_entailment"]),
                      T(["1", "A place of sorrow.", "Sorrow.", "entailment"])],
    "RTE/dev.tsv": ["index\tsentence1\tsentence2\tlabel",
                    T(["0", "Dana Reeve died.", "She died.", "entailment"])],
    "RTE/test.tsv": ["index\tsentence1\tsentence2", T(["0", "Mangla was built.", OPEN_QUOTE])],
    "WNLI/train.tsv": ["index\tsentence1\tsentence2\tlabel",
                       T(["0", "I stuck a pin through a carrot.", "The carrot had a hole.", "1"]),
                       T(["1", 'John "couldn\'t" see.', "John was short.", "0"])],
    "WNLI/dev.tsv": ["index\tsentence1\tsentence2\tlabel", T(["0", "The drain is clogged.", "It is.", "0"])],
    "WNLI/test.tsv": ["index\tsentence1\tsentence2", T(["0", "Maude and Dora saw trains.", "Trains."])],
    "diagnostic/diagnostic.tsv": ["index\tsentence1\tsentence2",
                                  T(["0", "The cat sat on the mat.", 'The "cat" did not sit.']),
                                  T(["1", "When you've got no snow.", "When you've got snow."])],
}


def write_glue(root, files=GLUE_FILES):
    for rel, lines in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # RTE with Windows line ends and every file with a trailing blank line, as real copies have.
        end = "\r\n" if rel.startswith("RTE/") else "\n"
        path.write_bytes((end.join(lines) + end + end).encode("utf-8"))
    return root


@pytest.fixture
def glue_root(tmp_path):
    return write_glue(tmp_path / "glue_data")


E = Example
EXPECTED = {
    ("cola", "train"): [E(0, ("Our friends won't buy this analysis.",), 1),
                        E(1, ('They drank the pub "dry" dry.',), 0), E(2, (OPEN_QUOTE,), 1)],
    ("cola", "validation"): [E(0, ("The sailors rode the breeze clear of the rocks.",), 1),
                             E(1, ('The "more" you eat.',), 0)],
    ("cola", "test"): [E(0, ("Bill whistled past the house.",), None),
                       E(1, ('A "quoted" test sentence.',), None)],
    ("sst2", "train"): [E(0, ("hide new secretions from the parental units ",), 0),
                        E(1, ('the " greatest " film ',), 1)],
    ("sst2", "validation"): [E(0, ("it 's a charming and often affecting journey . ",), 1)],
    ("sst2", "test"): [E(0, ("uneasy mishmash of styles and genres .",), None),
                       E(1, ('a " fresh " look .',), None)],
    ("mrpc", "train"): [E(0, ('Amrozi called him " the witness " .',
                              'Referring to him as only " the witness " , Amrozi accused him .'), 1),
                        E(1, ("Yucaipa owned Dominick 's .", "Yucaipa bought it ."), 0)],
    ("mrpc", "validation"): [E(0, ("He is here .", "He 's here ."), 1)],
    ("mrpc", "test"): [E(0, ("PCCW 's chief .", "Lim , the chief ."), None)],
    ("qqp", "train"): [E(0, ('What does "jlpt" mean?', "Which level is enough?"), 0),
                       E(1, ("How do I get rich?", "How can I get rich?"), 1)],
    ("qqp", "validation"): [E(0, ("Why are people lazy?", "Why do people stay lazy?"), 1)],
    ("qqp", "test"): [E(0, ("Would Trump win?", 'Is "Trump" winning?'), None),
                      E(1, ("What is ML?", "What is machine learning?"), None)],
    ("stsb", "train"): [E(0, ("A plane is taking off.", 'An "air plane" is taking off.'), 5.0),
                        E(1, ("A man plays a flute.", "A man is eating."), 0.5)],
    ("stsb", "validation"): [E(0, ("A man with a hat.", "A man wearing a hat."), 3.8)],
    ("stsb", "test"): [E(0, ("A girl is styling her hair.", "A girl is brushing her hair."), None)],
    ("mnli", "train"): [E(0, ("Conceptually cream skimming has two dimensions.",
                              "Product and geography are what make it work."), 1),
                        E(1, ('You know "during the season".', "You lose them."), 0)],
    ("mnli", "validation_matched"): [E(0, ("The new rights are nice.", "Everyone hates them."), 2)],
    ("mnli", "validation_mismatched"): [E(0, ('Your "gift" is appreciated.', "Hundreds gave."), 1),
                                        E(1, ("A b.", "A c."), 0)],
    ("mnli", "test_matched"): [E(0, ("Hierbas is a liqueur.", "It is a drink."), None)],
    ("mnli", "test_mismatched"): [E(0, ('What "had" happened?', "Nothing happened."), None),
                                  E(1, ("One.", "Two."), None)],
    ("qnli", "train"): [E(0, ("When did it start?", 'It started in "1948".'), 1),
                        E(1, ("Who wrote it?", "Orwell wrote it."), 0)],
    ("qnli", "validation"): [E(0, ("What is it?", "It is a cat."), 0)],
    ("qnli", "test"): [E(0, ("Where?", 'In "Paris".'), None)],
    ("rte", "train"): [E(0, ('No "weapons" were found.', "Weapons were found."), 1),
                       E(1, ("A place of sorrow.", "Sorrow."), 0)],
    ("rte", "validation"): [E(0, ("Dana Reeve died.", "She died."), 0)],
    ("rte", "test"): [E(0, ("Mangla was built.", OPEN_QUOTE), None)],
    ("wnli", "train"): [E(0, ("I stuck a pin through a carrot.", "The carrot had a hole."), 1),
                        E(1, ('John "couldn\'t" see.', "John was short."), 0)],
    ("wnli", "validation"): [E(0, ("The drain is clogged.", "It is."), 0)],
    ("wnli", "test"): [E(0, ("Maude and Dora saw trains.", "Trains."), None)],
    ("ax", "test"): [E(0, ("The cat sat on the mat.", 'The "cat" did not sit.'), None),
                     E(1, ("When you've got no snow.", "When you've got snow."), None)],
}


def test_expected_covers_every_task_and_split():
    assert set(EXPECTED) == {(t.name, s) for t in GLUE_TASKS.values() for s in t.splits}


@pytest.mark.parametrize("task,split", sorted(EXPECTED))
def test_official_tsv_folder_is_read_for_every_task_and_split(glue_root, task, split):
    assert read_tsv_split(glue_root, task, split) == EXPECTED[task, split]


def test_tsv_accepts_the_task_folder_itself(glue_root):
    assert read_tsv_split(glue_root / "MNLI", "mnli", "test_mismatched") == EXPECTED["mnli", "test_mismatched"]
    assert read_tsv_split(str(glue_root / "diagnostic"), "ax", "test") == EXPECTED["ax", "test"]


def test_tsv_idx_comes_from_the_index_column(tmp_path):
    root = write_glue(tmp_path, {"QNLI/test.tsv": ["index\tquestion\tsentence", T(["7", "Q?", "S."]),
                                                   T(["3", "R?", "T."])]})
    assert [e.idx for e in read_tsv_split(root, "qnli", "test")] == [7, 3]


def bad_tree(tmp_path, rel, lines):
    return write_glue(tmp_path, {rel: lines})


def test_tsv_wrong_column_count_names_file_and_line(tmp_path):
    root = bad_tree(tmp_path, "SST-2/train.tsv", ["sentence\tlabel", T(["good .", "1"]), T(["a", "tab", "1"])])
    with pytest.raises(UserError, match=r"SST-2/train\.tsv:3: expected 2 tab-separated columns .* found 3"):
        read_tsv_split(root, "sst2", "train")
    root = bad_tree(tmp_path, "CoLA/dev.tsv", [T(["gj04", "1", "", "ok ."]), T(["gj04", "1", "no star column"])])
    with pytest.raises(UserError, match=r"CoLA/dev\.tsv:2: expected 4 .*source, label, original_label, sentence"):
        read_tsv_split(root, "cola", "validation")


def test_tsv_bad_label_names_file_line_value_and_allowed_labels(tmp_path):
    root = bad_tree(tmp_path, "RTE/dev.tsv", ["index\tsentence1\tsentence2\tlabel",
                                              T(["0", "a", "b", "entailment"]), T(["1", "a", "b", "maybe"])])
    with pytest.raises(UserError, match=r"RTE/dev\.tsv:3: column label: label 'maybe' is not one of "
                                        r"0 \(entailment\), 1 \(not_entailment\)"):
        read_tsv_split(root, "rte", "validation")
    root = bad_tree(tmp_path, "CoLA/train.tsv", [T(["gj04", "2", "", "odd ."])])
    with pytest.raises(UserError, match=r"CoLA/train\.tsv:1: .*'2' is not one of 0 \(unacceptable\)"):
        read_tsv_split(root, "cola", "train")
    root = bad_tree(tmp_path, "STS-B/dev.tsv", [GLUE_FILES["STS-B/dev.tsv"][0], T(["0"] * 9 + ["5.5"])])
    with pytest.raises(UserError, match=r"STS-B/dev\.tsv:2: .*'5\.5' is not a number in \[0, 5\]"):
        read_tsv_split(root, "stsb", "validation")


def test_tsv_missing_folder_file_or_column(tmp_path, glue_root):
    with pytest.raises(UserError, match="nowhere does not exist.*CoLA/train.tsv"):
        read_tsv_split(tmp_path / "nowhere", "cola", "train")
    (glue_root / "MNLI" / "dev_matched.tsv").unlink()
    with pytest.raises(UserError, match=r"MNLI/dev_matched\.tsv not found.*validation_matched"):
        read_tsv_split(glue_root, "mnli", "validation_matched")
    root = bad_tree(tmp_path, "QNLI/dev.tsv", ["index\tquestion\ttext\tlabel", T(["0", "a", "b", "entailment"])])
    with pytest.raises(UserError, match=r"QNLI/dev\.tsv:1: header columns are .* which lack sentence"):
        read_tsv_split(root, "qnli", "validation")
    root = bad_tree(tmp_path, "WNLI/dev.tsv", ["index\tsentence1\tsentence2\tlabel", T(["x", "a", "b", "0"])])
    with pytest.raises(UserError, match=r"WNLI/dev\.tsv:2: column index should hold an integer"):
        read_tsv_split(root, "wnli", "validation")


# ---------------------------------------------------------------- JSONL

def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def test_jsonl_reads_ids_names_and_unlabelled(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [
        {"idx": 5, "premise": 'a "b', "hypothesis": "c", "label": 2},
        {"idx": 2, "premise": "d", "hypothesis": "e", "label": "neutral"}, ""])
    write_jsonl(tmp_path / "test_matched.jsonl", [
        {"premise": "f", "hypothesis": "g", "label": -1}, {"premise": "h", "hypothesis": "i"},
        {"premise": "j", "hypothesis": "k", "label": None}])
    assert read_jsonl_split(tmp_path, "mnli", "train") == [E(5, ('a "b', "c"), 2), E(2, ("d", "e"), 1)]
    assert read_jsonl_split(tmp_path, "mnli", "test_matched") == [
        E(0, ("f", "g"), None), E(1, ("h", "i"), None), E(2, ("j", "k"), None)]
    write_jsonl(tmp_path / "validation.jsonl", [{"idx": 0, "sentence1": "a", "sentence2": "b", "label": 4.2}])
    assert read_jsonl_split(tmp_path, "stsb", "validation") == [E(0, ("a", "b"), 4.2)]


@pytest.mark.parametrize("line,message", [
    ("{not json", r"validation\.jsonl:2: not valid JSON"),
    ('["a"]', r"validation\.jsonl:2: expected a JSON object"),
    ('{"sentence": "a", "label": "great"}', r"validation\.jsonl:2: field \"label\": label 'great' is not one of "
                                            r"0 \(negative\), 1 \(positive\)"),
    ('{"sentence": "a", "label": 3}', r"validation\.jsonl:2: field \"label\""),
    ('{"text": "a", "label": 1}', r"validation\.jsonl:2: field \"sentence\" must be a string \(it is missing\)"),
    ('{"idx": 0, "sentence": "a", "label": 1}', r"validation\.jsonl:2: idx 0 was already used on line 1"),
    ('{"idx": "0", "sentence": "a", "label": 1}', r"validation\.jsonl:2: field \"idx\" must be an integer"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    write_jsonl(tmp_path / "validation.jsonl", ['{"idx": 0, "sentence": "fine", "label": 1}', line])
    with pytest.raises(UserError, match=message):
        read_jsonl_split(tmp_path, "sst2", "validation")


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"test\.jsonl not found.*\"idx\", \"sentence\", \"label\""):
        read_jsonl_split(tmp_path, "cola", "test")


# ---------------------------------------------------------------- synthetic tasks

POSITIVE_WORDS = set(syn.POSITIVE) | {"liked", "enjoyed"}
# "like" is also an ordinary verb of the agreement sentences ("the dogs that the cat likes").
EVALUATIVE_WORDS = POSITIVE_WORDS | set(syn.NEGATIVE) | {"not", "enjoy"}


def sentiment_of(sentence):
    return int(bool(POSITIVE_WORDS & set(sentence.split())))


def sentences(text):
    return [s.strip() + " ." for s in text.split(" .") if s.strip()]


def agrees(sentence):
    tokens = sentence.split()
    subject = next(t for t in tokens if t in syn.NOUNS or t in syn.NOUNS.values())
    verb = [t for t in tokens if t in syn.VERBS or t in syn.VERBS.values()][-1]
    return (subject in syn.NOUNS.values()) == (verb in syn.VERBS.values())


@pytest.fixture(scope="module")
def synthetic():
    return {name: synthetic_split(name, "train", size=600) for name in SYNTHETIC_TASKS}


def test_synthetic_tasks_cover_every_type_and_are_registered():
    assert {t.type for t in SYNTHETIC_TASKS.values()} == {"classification", "pair", "similarity", "regression",
                                                           "multiple_choice"}
    assert all(name.startswith("synthetic_") and get_task(name) is t for name, t in SYNTHETIC_TASKS.items())


def test_synthetic_tasks_are_deterministic_and_random_access(synthetic):
    for name, examples in synthetic.items():
        assert synthetic_split(name, "train", size=20) == examples[:20]
        assert synthetic_example(name, "train", 17) == examples[17]
        assert [e.idx for e in examples] == list(range(600))
        assert synthetic_split(name, "train", seed=1, size=20) != examples[:20]
        assert synthetic_split(name, "validation", size=20) != examples[:20]
        assert len({e.texts for e in examples}) > 300, name
        assert len(synthetic_split(name, "test")) == 200


def test_synthetic_labels_are_balanced(synthetic):
    for name, examples in synthetic.items():
        task = get_task(name)
        counts = Counter(e.label for e in examples)
        classes = range(task.num_labels) if not task.is_regression else [float(s) for s in range(6)]
        assert set(counts) == set(classes), name
        assert min(counts.values()) > 0.6 * len(examples) / len(classes), (name, counts)


def test_synthetic_labels_follow_their_construction(synthetic):
    for e in synthetic["synthetic_sentiment"]:
        assert sentiment_of(e.texts[0]) == e.label
    for e in synthetic["synthetic_acceptability"]:
        assert agrees(e.texts[0]) == bool(e.label)
    for e in synthetic["synthetic_entailment"]:
        premise, hypothesis = e.texts
        verdict = syn.VERDICTS.index(hypothesis)
        if e.label == 1:
            assert not EVALUATIVE_WORDS & set(premise.split())
        else:
            assert (sentiment_of(premise) == verdict) == (e.label == 0)
    for e in synthetic["synthetic_paraphrase"]:
        assert (sentiment_of(e.texts[0]) == sentiment_of(e.texts[1])) == bool(e.label)
    for e in synthetic["synthetic_relatedness"]:
        a, b = (sum(map(sentiment_of, sentences(t))) for t in e.texts)
        assert all(len(sentences(t)) == 5 for t in e.texts)
        assert e.label == 5.0 - abs(a - b)


def test_synthetic_choice_layout():
    task = get_task("synthetic_choice")
    answers = tuple(f"answer_{i}" for i in range(4))
    assert (task.type, task.text_fields, task.label_names) == ("multiple_choice", ("context", *answers), answers)
    assert task.num_labels == 4 and task.format_prediction(3) == "3"
    with pytest.raises(AssertionError):  # one label per answer field
        Task("x", "multiple_choice", ("context", "a", "b"), ("a", "b", "c"), ("accuracy",), ("train",))


def test_synthetic_choice_has_exactly_one_answer_that_fits_the_story(synthetic):
    examples = synthetic["synthetic_choice"]
    for e in examples:
        context, *answers = e.texts
        assert len(answers) == 4 and len(set(answers)) == 4
        # The story names its protagonist before anyone else.
        protagonist = next(t for t in context.split() if t in syn.NAMES)
        pronoun = syn.PRONOUNS[syn.NAMES[protagonist]][0]
        fits, frames = [], set()
        for answer in answers:
            tokens = answer.split()
            subject = next(t for t in tokens if t in ("he", "she"))
            verb = next(t for t in tokens if t in syn.VERBS or t in syn.VERBS.values())
            fits.append(subject == pronoun and verb in syn.INTRANSITIVE_VERBS)
            frames.add(tuple("_" if t in (subject, verb) else t for t in tokens))
        # Minimal pairs: the answers differ only in the pronoun and the verb form.
        assert len(frames) == 1
        assert fits.count(True) == 1 and fits.index(True) == e.label
    # Which position is right carries no information: each holds it about a quarter of the time.
    counts = Counter(e.label for e in examples)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 0.18 * len(examples), counts


def test_synthetic_bad_arguments():
    with pytest.raises(UserError, match="unknown synthetic task 'synthetic_x'"):
        synthetic_split("synthetic_x", "train")
    with pytest.raises(UserError, match="no split 'dev'"):
        synthetic_split("synthetic_sentiment", "dev")


# ---------------------------------------------------------------- TFDS

def test_importing_tasks_does_not_import_tfds():
    code = "import sys, gptjax.tasks; assert 'tensorflow_datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tfds_records_become_examples_with_none_for_test_labels():
    stsb, mnli = get_task("stsb"), get_task("mnli")
    record = {"idx": np.int32(4), "sentence1": b"caf\xc3\xa9", "sentence2": "b", "label": np.float32(-1.0)}
    assert tfds_record_to_example(record, stsb) == E(4, ("caf\u00e9", "b"), None)
    record = {"idx": np.int32(2), "premise": b"a", "hypothesis": b"b", "label": np.int64(2)}
    assert tfds_record_to_example(record, mnli) == E(2, ("a", "b"), 2)


def test_tfds_unprepared_dataset_says_how_to_prepare_it_offline(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(UserError, match=r"glue/rte is not prepared under .*tfds build glue/rte "
                                        r"--file_format=array_record --data_dir DIR.*TFDS_DATA_DIR"):
        read_tfds_split("rte", "train", data_dir=str(tmp_path))


class FakeSource:
    """A data source of `n` records that logs its reads, whose batch reads work or raise."""

    def __init__(self, n, fail=False):
        self.n, self.reads = n, []
        if fail:
            self.__getitems__ = self._fail

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        self.reads.append(key)
        return {"idx": key}

    def __getitems__(self, keys):
        self.reads.append(list(keys))
        return [{"idx": k} for k in keys]

    def _fail(self, keys):
        raise TypeError("no batch reads here")


def test_tfds_records_are_read_in_chunks():
    source = FakeSource(10)
    assert [r["idx"] for r in tfds_records(source, chunk=4)] == list(range(10))
    assert source.reads == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(tfds_records(FakeSource(0), chunk=4)) == []


def test_tfds_records_fall_back_to_one_key_at_a_time():
    failing = FakeSource(6, fail=True)
    assert [r["idx"] for r in tfds_records(failing, chunk=4)] == list(range(6))
    assert failing.reads == list(range(6))  # a failed batch is not tried again

    class Plain:  # a Sequence without __getitems__
        def __len__(self):
            return 5

        def __getitem__(self, key):
            return {"idx": key}

    assert [r["idx"] for r in tfds_records(Plain(), chunk=2)] == list(range(5))


def test_tfds_mock_data_source_batched(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.core.data_sources import base
    # The mocked reader's own batch method cannot be called; answer batches through __getitem__
    # so that the batched path is the one exercised.
    batches = []
    monkeypatch.setattr(base.BaseDataSource, "__getitems__",
                        lambda self, keys: batches.append(list(keys)) or [self[k] for k in keys])
    with warnings.catch_warnings(), tfds.testing.mock_data(num_examples=6):
        warnings.simplefilter("ignore")
        examples = read_tfds_split("qqp", "test")
    assert batches == [list(range(6))]
    assert len(examples) == 6 and [e.idx for e in examples] == sorted(e.idx for e in examples)


@pytest.mark.parametrize("task,split", [("sst2", "train"), ("mnli", "validation_mismatched"),
                                        ("stsb", "test"), ("ax", "test")])
def test_tfds_mock_data_source(task, split):
    tfds = pytest.importorskip("tensorflow_datasets")
    with warnings.catch_warnings(), tfds.testing.mock_data(num_examples=6):
        warnings.simplefilter("ignore")
        examples = read_tfds_split(task, split)
    t = get_task(task)
    assert len(examples) == 6
    assert [e.idx for e in examples] == sorted(e.idx for e in examples)
    for e in examples:
        assert len(e.texts) == len(t.text_fields) and all(isinstance(x, str) for x in e.texts)
        assert isinstance(e.label, float) if t.is_regression else e.label in range(t.num_labels)


@pytest.mark.parametrize("name, fits_label", [("synthetic_coreference", 0), ("synthetic_coherence", 1)])
def test_coreference_labels_follow_the_protagonist(synthetic, name, fits_label):
    """The label is whether the sentence's pronoun is the protagonist's, whom the story names first."""
    from gptjax.data import synthetic as syn
    for ex in synthetic[name]:
        story, sentence = ex.texts
        protagonist = next(w for w in story.split() if w in syn.NAMES)
        pronoun = next(w for w in sentence.split() if w in ("he", "she"))
        fits = pronoun == syn.PRONOUNS[syn.NAMES[protagonist]][0]
        assert (ex.label == fits_label) == fits
        verb = sentence.split()[sentence.split().index(pronoun) + 1]
        assert verb in syn.INTRANSITIVE_VERBS  # always the agreeing (singular) form

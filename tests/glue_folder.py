"""A tiny GLUE-format TSV folder for tests that read tasks from `tsv:<folder>`."""

import os

import numpy as np


def glue_folder(root, test_size):
    """A GLUE-format TSV folder holding WNLI: labelled train and dev, an unlabelled test split."""
    folder = os.path.join(root, "WNLI")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    words = ["the cat sleeps .", "anna loved the film .", "he walks .", "i hated it ."]
    def rows(n, labelled):
        out = ["index\tsentence1\tsentence2" + ("\tlabel" if labelled else "")]
        for i in range(n):
            a, b = rng.choice(words, 2)
            out.append(f"{i}\t{a}\t{b}" + (f"\t{int(a == b)}" if labelled else ""))
        return "\n".join(out) + "\n"
    for name, n, labelled in (("train.tsv", 48, True), ("dev.tsv", 20, True), ("test.tsv", test_size, False)):
        with open(os.path.join(folder, name), "w") as f:
            f.write(rows(n, labelled))
    return root

"""Our torch metrics against scikit-learn on random labels (odd class counts, absent classes)."""
import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from memorymamba.metrics import classification_metrics, confusion_matrix, format_report


@pytest.mark.parametrize("k,n,seed", [(2, 17, 0), (6, 301, 1), (7, 53, 2), (11, 40, 3)])
def test_against_sklearn(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    # biased predictions: right 60% of the time, else random -- so some classes may get no prediction
    p = torch.where(torch.rand(n, generator=g) < 0.6, y, torch.randint(0, k, (n,), generator=g))
    m = classification_metrics(y, p, k)
    yn, pn = y.numpy(), p.numpy()
    errs = {"accuracy": abs(m["accuracy"] - skm.accuracy_score(yn, pn))}
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(yn, pn, average=avg, zero_division=0)
        errs[f"{avg}_precision"] = abs(m[f"{avg}_precision"] - pr)
        errs[f"{avg}_recall"] = abs(m[f"{avg}_recall"] - rc)
        errs[f"{avg}_f1"] = abs(m[f"{avg}_f1"] - f1)
    labels = list(range(k))
    pr, rc, f1, sup = skm.precision_recall_fscore_support(yn, pn, labels=labels, zero_division=0)
    per = np.array([[v["precision"], v["recall"], v["f1"], v["support"]] for v in m["per_class"].values()])
    errs["per_class"] = float(np.abs(per - np.stack([pr, rc, f1, sup], 1)).max())
    print(f"k={k} n={n} max errors vs sklearn:", {a: f"{b:.2e}" for a, b in errs.items()})
    assert max(errs.values()) < 1e-12
    cm = skm.confusion_matrix(yn, pn, labels=labels)
    assert m["confusion"] == cm.tolist()
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    assert np.abs(np.array(m["confusion_normalized"]) - norm).max() < 1e-12


def test_absent_class_and_report():
    # class 2 appears neither in truth nor in predictions: left out of the macro mean, as sklearn does
    y = torch.tensor([0, 0, 1, 1, 3, 3, 3])
    p = torch.tensor([0, 1, 1, 1, 3, 0, 3])
    m = classification_metrics(y, p, 4, ["a", "b", "c", "d"])
    f1 = skm.f1_score(y.numpy(), p.numpy(), average="macro", zero_division=0)
    assert abs(m["macro_f1"] - f1) < 1e-12
    assert m["per_class"]["c"]["support"] == 0 and m["confusion_normalized"][2] == [0.0] * 4
    text = format_report(m)
    assert "accuracy (micro)" in text and "weighted avg" in text


def test_bad_labels_named():
    with pytest.raises(ValueError, match=r"pred labels must lie in \[0, 3\)"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="same length"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)

"""alt-profanity-check's classifier, scored in NumPy without scikit-learn in the process.

The package ships a fitted ``TfidfVectorizer`` and a ``CalibratedClassifierCV`` (5 ``LinearSVC`` folds, sigmoid
calibration) as joblib pickles. Unpickling them imports scikit-learn and SciPy: about 110 MB of resident memory
in a training process whose whole peak is ~550 MB at the benchmark's tiny sizes, and every call pays ~7 ms of
input validation for 16 short texts. So the fitted numbers are exported once, by a subprocess that has
scikit-learn, to ``<cache>/reward/profanity_check-<version>-<hash>.npz``, and scored here with the same arithmetic:

- tokens: ``token_pattern.findall(text.lower())``, minus the stop words, looked up in the vocabulary;
- ``x = l2_normalise(count * idf)`` over the vocabulary;
- per fold ``f``: ``d_f = coef_f . x + intercept_f`` and ``p_f = 1 / (1 + exp(a_f * d_f + b_f))``;
- ``P(offensive) = mean_f p_f``.

The export refuses any fitted object it does not reproduce exactly (other n-gram ranges, analyzers, norms,
calibration methods...); :class:`detoxflow.models.reward.ProfanityCheckScorer` then calls the package itself.
tests/test_reward.py checks equality with ``profanity_check.predict_prob`` on real dialogue summaries and on
offensive texts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from detoxflow.atomic import atomic_file
from detoxflow.paths import cache_dir

# Runs in a subprocess: argv[1] is the .npz to write. Exits 3 with a message on stderr when the fitted objects
# are not the kind this module reproduces.
_EXPORT = r"""
import sys
import numpy as np
from profanity_check import profanity_check as pc

v, m = pc.vectorizer, pc.model
expected = {"analyzer": "word", "ngram_range": (1, 1), "lowercase": True, "strip_accents": None,
            "preprocessor": None, "tokenizer": None, "binary": False, "sublinear_tf": False, "norm": "l2",
            "use_idf": True, "input": "content"}
got = {k: v.get_params().get(k) for k in expected}
if type(v).__name__ != "TfidfVectorizer" or got != expected:
    sys.exit(f"vectorizer {type(v).__name__} with {got}, expected TfidfVectorizer with {expected}")
if type(m).__name__ != "CalibratedClassifierCV" or list(m.classes_) != [0, 1]:
    sys.exit(f"model {type(m).__name__} with classes {list(getattr(m, 'classes_', []))}")
coef, intercept, a, b = [], [], [], []
for cc in m.calibrated_classifiers_:
    est = cc.estimator
    if cc.method != "sigmoid" or len(cc.calibrators) != 1 or est.coef_.shape[0] != 1:
        sys.exit(f"calibrated fold with method {cc.method}, {len(cc.calibrators)} calibrators, coef {est.coef_.shape}")
    coef.append(np.asarray(est.coef_, dtype=np.float64)[0])
    intercept.append(float(np.ravel(est.intercept_)[0]))
    a.append(float(cc.calibrators[0].a_))
    b.append(float(cc.calibrators[0].b_))
vocab = sorted(v.vocabulary_.items(), key=lambda kv: kv[1])
if [i for _, i in vocab] != list(range(len(vocab))):
    sys.exit("vocabulary indices are not 0..V-1")
np.savez(sys.argv[1], terms=np.array([t for t, _ in vocab]), idf=np.asarray(v.idf_, dtype=np.float64),
         coef=np.stack(coef), intercept=np.array(intercept), a=np.array(a), b=np.array(b),
         token_pattern=np.array(v.token_pattern), stop_words=np.array(sorted(v.get_stop_words() or ())))
"""


class ExportError(RuntimeError):
    """The package's fitted model could not be exported (missing, or a kind this module does not reproduce)."""


def _package_data() -> tuple[str, list[Path]]:
    """``-> (version, [vectorizer.joblib, model.joblib])``, located without importing the package (its import
    unpickles the model, which is what this module avoids)."""
    spec = importlib.util.find_spec("profanity_check")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the alt-profanity-check package is not installed: pip install alt-profanity-check")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = [data / "vectorizer.joblib", data / "model.joblib"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"alt-profanity-check is installed without its model files {missing}; reinstall it")
    return importlib.metadata.version("alt-profanity-check"), files


def exported_path() -> Path:
    """Where this installation's export lives (and is written on first use)."""
    version, files = _package_data()
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return cache_dir() / "reward" / f"profanity_check-{version}-{digest.hexdigest()[:12]}.npz"


def export(path: Path, timeout: float = 300.0) -> Path:
    """Write the export to ``path`` (atomically: a temporary file renamed into place) by a subprocess."""
    with atomic_file(path, suffix=".tmp.npz") as tmp:
        proc = subprocess.run([sys.executable, "-c", _EXPORT, str(tmp)], capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise ExportError(f"exporting alt-profanity-check's model failed (exit {proc.returncode}): "
                              f"{proc.stderr.strip()[-800:]}")
    return path


class ProfanityModel:
    """The exported classifier: ``predict_prob(texts) -> (B,)`` float64 P(offensive)."""

    def __init__(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            self.vocab = {str(t): i for i, t in enumerate(z["terms"])}
            self.idf, self.coef, self.intercept = z["idf"], z["coef"], z["intercept"]  # (V,), (F, V), (F,)
            self.a, self.b = z["a"], z["b"]  # (F,) each
            self.pattern = re.compile(str(z["token_pattern"]))
            self.stop_words = frozenset(str(w) for w in z["stop_words"])
        if self.coef.shape != (len(self.intercept), len(self.vocab)) or self.idf.shape != (len(self.vocab),):
            raise ExportError(f"{path}: inconsistent export (coef {self.coef.shape}, idf {self.idf.shape}, "
                              f"{len(self.vocab)} terms); delete the file to export again")

    @classmethod
    def load(cls) -> ProfanityModel:
        """This installation's export, written first if missing."""
        path = exported_path()
        if not path.is_file():
            export(path)
        try:
            return cls(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, ExportError):  # a damaged file: export again
            return cls(export(path))

    def decision(self, text: str) -> np.ndarray:
        """``-> (F,)``: each fold's SVM decision value for one text."""
        counts = Counter(j for tok in self.pattern.findall(text.lower())
                         if tok not in self.stop_words and (j := self.vocab.get(tok)) is not None)
        if not counts:
            return self.intercept.copy()
        idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        w = np.fromiter(counts.values(), dtype=np.float64, count=len(counts)) * self.idf[idx]
        w /= np.sqrt(w @ w)
        return self.coef[:, idx] @ w + self.intercept

    def predict_prob(self, texts: Sequence[str]) -> np.ndarray:
        """``texts (B) -> P(offensive) (B,)``, the package's ``predict_prob``."""
        if not texts:
            return np.zeros(0)
        d = np.stack([self.decision(t) for t in texts])  # (B, F)
        return (1.0 / (1.0 + np.exp(self.a * d + self.b))).mean(axis=1)

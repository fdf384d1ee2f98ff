"""Model artifacts on disk -> one in-memory description every backend compiles from.

A model file may have any name (SageMaker's ``xgboost-model`` has no extension), so the format is
sniffed from its bytes. Every format is converted to a Treelite model, the common form the
backends flatten or generate code from; the reference library (XGBoost, LightGBM, or Treelite's
GTIL for checkpoints) is kept at hand because it is the specification the backends are verified
against.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from rtbserve.errors import ArtifactError, UnsupportedModel

# File names tried, in order, when a directory is given (SageMaker and common conventions).
MODEL_FILE_NAMES = (
    "xgboost-model",
    "model.json",
    "model.ubj",
    "model.bst",
    "model.bin",
    "model.model",
    "model.txt",
    "lightgbm-model",
    "model.lgb",
    "model.tl",
    "model.treelite",
)
# Side files that live next to a model and are never the model itself.
_SIDE_FILES = {"features.json", "rtbserve.toml", "sample.csv", "README.md", "model.tar.gz"}

FORMATS = ("xgboost-json", "xgboost-ubjson", "xgboost-binary", "lightgbm", "treelite")
_UBJSON_MARKERS = b"iUIlLdDSHTFZN$#{["


def find_model_file(path: str | os.PathLike[str]) -> Path:
    """Return the model file at ``path``: the file itself, or the one model inside a directory."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise ArtifactError(f"model path {str(p)!r} does not exist")
    if not p.is_dir():
        raise ArtifactError(f"model path {str(p)!r} is neither a file nor a directory")
    for name in MODEL_FILE_NAMES:
        if (p / name).is_file():
            return p / name
    candidates = sorted(
        c
        for c in p.iterdir()
        if c.is_file() and not c.name.startswith(".") and c.name not in _SIDE_FILES
    )
    sniffed = [c for c in candidates if _sniff_format(_read_head(c)) is not None]
    if len(sniffed) == 1:
        return sniffed[0]
    found = ", ".join(c.name for c in candidates) or "no files"
    if not sniffed:
        raise ArtifactError(
            f"no model file in directory {str(p)!r}: expected one of "
            f"{', '.join(MODEL_FILE_NAMES)} or a single XGBoost/LightGBM/Treelite file; "
            f"found {found}"
        )
    raise ArtifactError(
        f"several model files in directory {str(p)!r} ({', '.join(c.name for c in sniffed)}); "
        "name one of them, or keep one model per directory"
    )


def _read_head(path: Path, n_bytes: int = 64) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n_bytes)


def _sniff_format(head: bytes) -> str | None:
    """Guess the format from a file's first bytes; None when it is no model format we know."""
    stripped = head.lstrip()
    if stripped.startswith(b"{"):
        rest = stripped[1:].lstrip()
        if rest[:1] in (b'"', b"}"):
            return "xgboost-json"
        if rest[:1] and rest[:1] in _UBJSON_MARKERS:
            return "xgboost-ubjson"
        return None
    if head.startswith(b"tree\n") or head.startswith(b"tree\r\n"):
        return "lightgbm"
    if len(head) >= 12:
        major, minor, _patch = np.frombuffer(head[:12], dtype="<i4")
        if 3 <= major <= 9 and 0 <= minor < 100:
            return "treelite"
    if head.startswith(b"binf") or (len(head) >= 12 and _looks_like_xgb_legacy(head)):
        return "xgboost-binary"
    return None


def _looks_like_xgb_legacy(head: bytes) -> bool:
    # Legacy binary opens with LearnerModelParam: float base_score, uint32 num_feature,
    # int32 num_class. A finite base score and a sane feature count are a cheap, strict check.
    base_score = np.frombuffer(head[:4], dtype="<f4")[0]
    num_feature, num_class = np.frombuffer(head[4:12], dtype="<i4")
    return bool(
        np.isfinite(base_score) and 0 < num_feature < 10_000_000 and 0 <= num_class < 100_000
    )


@dataclass(frozen=True)
class OutputSpec:
    """How raw tree sums become the model's output."""

    n_outputs: int  # columns of the output: 1 for binary/regression, K for K classes
    postprocessor: str  # treelite name: identity, sigmoid, softmax, exponential, ...
    sigmoid_alpha: float
    is_classifier: bool
    is_multiclass: bool
    objective: str  # as the source library names it


@dataclass
class ModelSource:
    """A model file, its format, its Treelite form and its reference library.

    Not thread-safe while the lazy properties are first computed; the registry builds one per
    load under its lock.
    """

    path: Path
    raw: bytes = field(repr=False)
    format: str

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, isolate: bool = True) -> ModelSource:
        """Read and sniff a model file.

        isolate: parse binary formats (UBJSON, legacy binary, Treelite) once in a child process
        first. XGBoost's UBJSON reader can segfault and Treelite's deserializer can hang on
        corrupted bytes; a child that dies or stalls turns into an ``ArtifactError`` here.
        """
        file = find_model_file(path)
        raw = file.read_bytes()
        if not raw.strip():
            raise ArtifactError(f"model file {str(file)!r} is empty")
        fmt = _sniff_format(raw[:64])
        if fmt is None:
            raise ArtifactError(
                f"{str(file)!r} is not a model file: expected XGBoost JSON/UBJSON/legacy binary, "
                "a LightGBM text model or a Treelite checkpoint"
            )
        if fmt == "lightgbm" and b"\nend of trees" not in raw:
            # LightGBM aborts the process on a truncated model string
            raise ArtifactError(
                f"{str(file)!r} is a truncated LightGBM model: no 'end of trees' line"
            )
        if isolate and fmt in _NATIVE_PARSE_RISK:
            _parse_in_child(file, fmt)
        return cls(path=file, raw=raw, format=fmt)

    def validate(self) -> None:
        """Refuse structurally impossible models before any native code indexes with them."""
        tl = self.treelite
        n_features = self.n_features
        for t in range(tl.num_tree):
            acc = tl.get_tree_accessor(t)
            internal = acc.get_field("cleft") >= 0
            split = acc.get_field("split_index")[internal]
            if split.size and (split.min() < 0 or split.max() >= n_features):
                raise ArtifactError(
                    f"{str(self.path)!r}: tree {t} splits on feature {int(split.max())}, but the "
                    f"model declares {n_features} features"
                )

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def family(self) -> str:
        """The library that wrote the model: xgboost, lightgbm or treelite."""
        if self.format.startswith("xgboost"):
            return "xgboost"
        return self.format

    @property
    def reference_name(self) -> str:
        """The reference library's backend name: xgboost, lightgbm or gtil.

        xgboost >= 3.1 no longer reads the legacy binary format, so Treelite's GTIL (which does,
        and matches xgboost 1.7 exactly on our fixtures) is the reference for those files.
        """
        if self.format == "xgboost-binary" or self.family == "treelite":
            return "gtil"
        return self.family

    # -- reference library ------------------------------------------------------------------

    @cached_property
    def reference(self) -> Any:
        """The reference library's own model object (xgboost.Booster, lightgbm.Booster, ...)."""
        try:
            if self.reference_name == "xgboost":
                import xgboost

                booster = xgboost.Booster()
                booster.load_model(bytearray(self.raw))
                booster.set_param({"nthread": 1})
                return booster
            if self.reference_name == "lightgbm":
                import lightgbm

                return lightgbm.Booster(model_str=self.raw.decode("utf-8"))
            return self.treelite
        except ImportError as exc:
            raise UnsupportedModel(
                f"{self.family} models need the {self.family} package: pip install {self.family}"
            ) from exc
        except Exception as exc:  # the libraries raise their own, unrelated types
            raise ArtifactError(
                f"{str(self.path)!r} looks like a {self.format} model but does not load: "
                f"{_first_line(exc)}"
            ) from exc

    @cached_property
    def treelite(self) -> Any:
        """The model as a ``treelite.Model`` (the form backends compile from)."""
        import treelite

        try:
            if self.family == "xgboost":
                if self.format == "xgboost-binary":
                    return treelite.frontend.load_xgboost_model_legacy_binary(str(self.path))
                return treelite.frontend.from_xgboost(self.reference)
            if self.family == "lightgbm":
                return treelite.frontend.from_lightgbm(self.reference)
            return treelite.Model.deserialize_bytes(self.raw)
        except ArtifactError:
            raise
        except Exception as exc:
            raise ArtifactError(
                f"{str(self.path)!r} looks like a {self.format} model but Treelite cannot read "
                f"it: {_first_line(exc)}"
            ) from exc

    # -- model facts --------------------------------------------------------------------------

    @cached_property
    def header(self) -> dict[str, Any]:
        acc = self.treelite.get_header_accessor()
        names = (
            "num_feature", "num_target", "num_class", "postprocessor", "sigmoid_alpha",
            "base_scores", "average_tree_output", "task_type", "leaf_output_type",
            "threshold_type", "class_id", "target_id",
        )  # fmt: skip
        return {n: acc.get_field(n) for n in names}

    @property
    def n_features(self) -> int:
        return int(self.header["num_feature"][0])

    @cached_property
    def output(self) -> OutputSpec:
        h = self.header
        if int(h["num_target"][0]) != 1:
            raise UnsupportedModel(
                f"multi-target models are not served (this one has {int(h['num_target'][0])} "
                "targets); train one model per target"
            )
        k = int(h["num_class"][0])
        post = str(h["postprocessor"])
        objective = self._objective()
        is_multiclass = k > 1
        # reg:logistic also ends in a sigmoid but is a regressor: it has no labels
        known = self.reference_name in ("xgboost", "lightgbm")
        is_binary = objective.startswith("binary") or objective in ("cross_entropy", "xentropy")
        is_classifier = is_multiclass or is_binary or (not known and post == "sigmoid")
        return OutputSpec(
            n_outputs=k,
            postprocessor=post,
            sigmoid_alpha=float(h["sigmoid_alpha"][0]),
            is_classifier=is_classifier,
            is_multiclass=is_multiclass,
            objective=objective,
        )

    def _objective(self) -> str:
        if self.reference_name == "xgboost":
            import orjson

            config = orjson.loads(self.reference.save_config())
            return str(config["learner"]["objective"]["name"])
        if self.family == "lightgbm":
            for line in self.raw[:4096].decode("utf-8", "replace").splitlines():
                if line.startswith("objective="):
                    return line.split("=", 1)[1].split()[0]
        return str(self.header["postprocessor"])

    @cached_property
    def feature_names(self) -> list[str] | None:
        if self.reference_name == "xgboost":
            names = self.reference.feature_names
            return list(names) if names else None
        if self.reference_name == "lightgbm":
            return list(self.reference.feature_name())
        return None

    @cached_property
    def has_categorical(self) -> bool:
        tl = self.treelite
        return any(
            bool(tl.get_tree_accessor(t).get_field("has_categorical_split")[0])
            for t in range(tl.num_tree)
        )

    def reference_predict(self, X: np.ndarray, *, margin: bool) -> np.ndarray:
        """Scores from the reference library: (n,) or (n, K), float64. X is float32 (n, F)."""
        ref = self.reference
        if self.reference_name == "xgboost":
            out = ref.inplace_predict(
                X, predict_type="margin" if margin else "value", validate_features=False
            )
            if not margin and self.output.objective == "multi:softmax":
                # softmax objective predicts labels; probabilities come from its margins
                m = ref.inplace_predict(X, predict_type="margin", validate_features=False)
                out = _softmax(np.asarray(m, dtype=np.float64))
        elif self.reference_name == "lightgbm":
            out = ref.predict(X, raw_score=margin, num_threads=1)
        else:
            import treelite

            out = treelite.gtil.predict(self.treelite, X, nthread=1, pred_margin=margin)
        out = np.asarray(out, dtype=np.float64)
        return out.reshape(X.shape[0], -1) if self.output.is_multiclass else out.reshape(-1)


def _softmax(m: np.ndarray) -> np.ndarray:
    e = np.exp(m - m.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


_NATIVE_PARSE_RISK = ("xgboost-ubjson", "xgboost-binary", "treelite")
_CHILD_TIMEOUT_S = 10  # plus 1 s per 10 MB; a sound file parses in well under a second


def _parse_in_child(file: Path, fmt: str) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "rtbserve.predictors.source", str(file)]
    timeout_s = _CHILD_TIMEOUT_S + file.stat().st_size / 10e6
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ArtifactError(
            f"{str(file)!r} looks like a {fmt} model but its parser did not finish in "
            f"{timeout_s:.0f} s; the file is probably corrupted"
        ) from None
    if proc.returncode < 0:
        raise ArtifactError(
            f"{str(file)!r} looks like a {fmt} model but crashed its parser (signal "
            f"{-proc.returncode}); the file is corrupted"
        )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise ArtifactError(lines[-1] if lines else f"{str(file)!r} does not load as {fmt}")


def _check_main(path: str) -> int:
    """Child side of ``_parse_in_child``: parse fully, print the error line on failure."""
    import sys

    try:
        src = ModelSource.from_path(path, isolate=False)
        _ = src.reference, src.treelite, src.output
        src.validate()
    except ArtifactError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


def _first_line(exc: BaseException) -> str:
    """The informative line of a native library's error (not its backtrace)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("[bt]", "Stack trace"))]
    return lines[-1] if lines else type(exc).__name__


if __name__ == "__main__":
    import sys

    raise SystemExit(_check_main(sys.argv[1]))

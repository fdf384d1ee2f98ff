"""Train the bundled ``rtb-filter`` demo model from synthetic OpenRTB-like bid requests.

The model answers "would the DSP bid on this request?" (``binary:logistic``). Everything is
generated with a seeded ``numpy.random.default_rng`` and trained with a fixed XGBoost seed and
thread count, so two runs with the same arguments write byte-identical files.

Usage::

    .venv/bin/python models/train_rtb_filter.py [--out models/rtb-filter] [--rows N] [--seed S]

Outputs (in ``--out``): ``model.json`` (XGBoost JSON), ``features.json`` (feature schema, one
entry per column in order) and ``sample.csv`` (100 held-out feature rows, no header/label,
empty field for NaN).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import xgboost as xgb

MODEL_NAME = "rtb-filter"
OBJECTIVE = "binary:logistic"
THRESHOLD = 0.5
MISSING = "NaN when absent"

NUM_TREES = 320
PARAMS = {
    "objective": OBJECTIVE,
    "tree_method": "hist",
    "max_depth": 7,
    "eta": 0.1,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "min_child_weight": 5.0,
    "lambda": 1.0,
    "max_bin": 256,
    "nthread": 2,
    "seed": 20240611,
    "verbosity": 1,
}

# --------------------------------------------------------------------------- raw vocabularies

EXCHANGES = ["adx", "appnexus", "rubicon", "openx", "pubmatic", "index", "smaato", "inmobi"]
EXCHANGE_P = [0.30, 0.16, 0.13, 0.10, 0.10, 0.09, 0.07, 0.05]
# Hidden per-exchange value multiplier (win-rate / shading quality).
EXCHANGE_MULT = np.array([1.10, 1.00, 0.90, 1.05, 0.80, 1.00, 0.95, 1.20])

# name -> OpenRTB 2.5 device.devicetype codes that map onto it
DEVICE_TYPES = {"mobile": [1, 4], "desktop": [2], "tablet": [5], "ctv": [3, 7]}
DEVICE_P = [0.58, 0.27, 0.09, 0.06]
MOBILE, DESKTOP, TABLET, CTV = range(4)

OSES = ["ios", "android", "windows", "macos", "other"]
IOS, ANDROID, WINDOWS, MACOS, OTHER_OS = range(5)
# P(os | device type), rows follow DEVICE_TYPES order.
OS_GIVEN_DEVICE = np.array(
    [
        [0.42, 0.57, 0.00, 0.00, 0.01],  # mobile
        [0.00, 0.00, 0.70, 0.24, 0.06],  # desktop
        [0.55, 0.44, 0.00, 0.00, 0.01],  # tablet
        [0.05, 0.35, 0.00, 0.00, 0.60],  # ctv (tvOS counted as ios, Roku/Tizen/webOS as other)
    ]
)

# ISO-3166-1 alpha-3 as in device.geo.country; (share, hidden value multiplier, centroid lat, lon)
COUNTRIES = {
    "USA": (0.34, 2.40, 39.8, -98.6),
    "GBR": (0.08, 1.90, 53.0, -1.5),
    "DEU": (0.07, 1.70, 51.1, 10.4),
    "FRA": (0.06, 1.20, 46.6, 2.4),
    "CAN": (0.05, 1.80, 50.0, -95.0),
    "AUS": (0.04, 1.80, -27.0, 140.0),
    "JPN": (0.06, 1.60, 36.2, 138.3),
    "BRA": (0.06, 0.50, -14.2, -51.9),
    "IND": (0.07, 0.30, 21.0, 78.0),
    "MEX": (0.04, 0.50, 23.6, -102.5),
    "ESP": (0.03, 1.00, 40.4, -3.7),
    "ITA": (0.03, 1.00, 42.8, 12.6),
    "NLD": (0.02, 1.50, 52.1, 5.3),
    "IDN": (0.03, 0.30, -2.5, 118.0),
    "PHL": (0.02, 0.30, 12.9, 121.8),
}
COUNTRY_CODES = list(COUNTRIES)
COUNTRY_TABLE = np.array([v for v in COUNTRIES.values()], dtype=np.float64)

# Common IAB sizes: (w, h, hidden value multiplier, P|mobile, P|desktop, P|tablet, P|ctv)
AD_SIZES = [
    (300, 250, 1.00, 0.30, 0.30, 0.25, 0.00),
    (728, 90, 0.85, 0.00, 0.22, 0.15, 0.00),
    (320, 50, 0.70, 0.40, 0.00, 0.05, 0.00),
    (300, 600, 1.30, 0.00, 0.13, 0.05, 0.00),
    (160, 600, 0.90, 0.00, 0.10, 0.00, 0.00),
    (970, 250, 1.30, 0.00, 0.10, 0.05, 0.00),
    (320, 480, 1.20, 0.20, 0.00, 0.05, 0.00),
    (300, 50, 0.60, 0.10, 0.00, 0.00, 0.00),
    (468, 60, 0.70, 0.00, 0.15, 0.00, 0.00),
    (1024, 768, 1.25, 0.00, 0.00, 0.40, 0.00),
    (1920, 1080, 1.00, 0.00, 0.00, 0.00, 1.00),
]
AD_SIZE_NAMES = [f"{w}x{h}" for w, h, *_ in AD_SIZES]
AD_SIZE_TABLE = np.array(AD_SIZES, dtype=np.float64)

# OpenRTB 2.5 device.connectiontype
CONNECTION_TYPES = {
    "unknown": 0,
    "ethernet": 1,
    "wifi": 2,
    "cellular_unknown": 3,
    "2g": 4,
    "3g": 5,
    "4g": 6,
    "5g": 7,
}

NUM_SEGMENTS = 20
SEGMENT_BASE_ID = 1001  # user.data[].segment[].id of segment k is "seg-{1001 + k}"
SEGMENT_P = np.linspace(0.04, 0.35, NUM_SEGMENTS)[::-1]
TARGET_SEGMENTS = [2, 5, 7, 11, 13, 17]

# Local hour-of-day traffic shape (evening peak, overnight trough).
HOUR_WEIGHTS = np.array(
    [3, 2, 1.5, 1, 1, 1.5, 2.5, 4, 5, 5, 5, 5.5, 6, 6, 5.5, 5.5, 6, 6.5, 7, 7.5, 7.5, 7, 6, 4.5]
)
TMAX_CHOICES = np.array([100, 120, 150, 200, 250, 300], dtype=np.float64)
TMAX_P = [0.20, 0.25, 0.20, 0.20, 0.10, 0.05]


# --------------------------------------------------------------------------- synthetic requests


def generate_requests(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw ``n`` raw bid requests as a dict of column arrays (NaN = field absent)."""
    r: dict[str, np.ndarray] = {}
    r["exchange"] = rng.choice(len(EXCHANGES), size=n, p=EXCHANGE_P)
    dev = rng.choice(len(DEVICE_TYPES), size=n, p=DEVICE_P)
    r["device_type"] = dev
    # OS conditional on device type (inverse-CDF per row).
    cdf = np.cumsum(OS_GIVEN_DEVICE, axis=1)[dev]
    r["os"] = np.minimum((rng.random(n)[:, None] > cdf).sum(axis=1), len(OSES) - 1)

    country = rng.choice(len(COUNTRIES), size=n, p=COUNTRY_TABLE[:, 0] / COUNTRY_TABLE[:, 0].sum())
    r["country"] = country
    country_missing = rng.random(n) < 0.02

    p_app = np.array([0.72, 0.04, 0.60, 0.95])[dev]
    is_app = rng.random(n) < p_app
    r["is_app"] = is_app

    size_p = AD_SIZE_TABLE[:, 3:7].T  # (device, size)
    size_p = size_p / size_p.sum(axis=1, keepdims=True)
    size_cdf = np.cumsum(size_p, axis=1)[dev]
    size = np.minimum((rng.random(n)[:, None] > size_cdf).sum(axis=1), len(AD_SIZES) - 1)
    r["ad_size"] = size

    # Bid floor: lognormal CPM, higher in rich geos and for big formats, rounded to cents.
    floor_median = 0.45 * COUNTRY_TABLE[country, 1] ** 0.7 * AD_SIZE_TABLE[size, 2]
    floor_median = floor_median * np.where(dev == CTV, 4.0, 1.0)
    floor = np.round(floor_median * rng.lognormal(0.0, 0.8, n), 2)
    floor = np.maximum(floor, 0.01)
    floor[rng.random(n) < 0.05] = np.nan  # no floor sent
    r["bidfloor"] = floor

    # Local time: hour from the traffic shape, day of week slightly weekday-heavy.
    r["hour"] = rng.choice(24, size=n, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    r["dow"] = rng.choice(7, size=n, p=[0.15, 0.15, 0.15, 0.15, 0.15, 0.125, 0.125])

    seg = rng.random((n, NUM_SEGMENTS)) < SEGMENT_P
    # Correlated interest clusters: segment 3 users often also carry segment 8.
    seg[:, 8] |= seg[:, 3] & (rng.random(n) < 0.4)
    lmt = rng.random(n) < np.where(r["os"] == IOS, 0.25, 0.08)
    # Fewer segments for users that limit tracking.
    seg &= ~(lmt[:, None] & (rng.random((n, NUM_SEGMENTS)) < 0.7))
    r["segments"] = seg
    r["lmt"] = lmt
    r["dnt"] = rng.random(n) < np.where(dev == DESKTOP, 0.10, 0.02)

    r["pub_quality"] = np.round(rng.beta(5.0, 2.5, n), 3)
    view = np.clip(rng.beta(2.5, 2.0, n) + np.where(size == 3, 0.1, 0.0), 0.0, 1.0)
    view = np.round(view, 2)
    view[rng.random(n) < 0.15] = np.nan
    r["viewability"] = view

    cookie_age = np.round(rng.exponential(45.0, n), 1)
    cookie_age[(rng.random(n) < 0.30) | (is_app & (rng.random(n) < 0.5))] = np.nan
    r["cookie_age_days"] = cookie_age

    r["secure"] = rng.random(n) < np.where(is_app, 0.85, 0.93)
    r["has_ifa"] = is_app & ~lmt & (dev != DESKTOP) & (rng.random(n) < 0.92)

    conn_p = {
        MOBILE: [0.02, 0.00, 0.45, 0.05, 0.01, 0.05, 0.32, 0.10],
        DESKTOP: [0.10, 0.35, 0.55, 0.00, 0.00, 0.00, 0.00, 0.00],
        TABLET: [0.05, 0.00, 0.80, 0.03, 0.00, 0.02, 0.08, 0.02],
        CTV: [0.05, 0.40, 0.55, 0.00, 0.00, 0.00, 0.00, 0.00],
    }
    conn = np.zeros(n, dtype=np.float64)
    for d, p in conn_p.items():
        mask = dev == d
        conn[mask] = rng.choice(8, size=int(mask.sum()), p=p)
    conn[rng.random(n) < 0.10] = np.nan
    r["connectiontype"] = conn

    lat = COUNTRY_TABLE[country, 2] + rng.normal(0.0, 3.0, n)
    lon = COUNTRY_TABLE[country, 3] + rng.normal(0.0, 5.0, n)
    geo_missing = (rng.random(n) < 0.20) | lmt | country_missing
    lat = np.round(np.clip(lat, -90, 90), 2)
    lon = np.round(np.clip(lon, -180, 180), 2)
    lat[geo_missing] = np.nan
    lon[geo_missing] = np.nan
    r["lat"], r["lon"] = lat, lon

    seen = rng.random(n) < 0.6
    recency = np.round(rng.lognormal(7.0, 2.0, n))  # seconds since last impression
    recency[~seen] = np.nan
    r["recency_s"] = recency
    r["freq_24h"] = np.where(seen, rng.negative_binomial(1.2, 0.3, n), 0).astype(np.float64)

    r["tmax"] = rng.choice(TMAX_CHOICES, size=n, p=TMAX_P)
    r["imp_count"] = 1 + rng.binomial(3, 0.15, n)
    r["instl"] = (size == 6) | (size == 9) | (is_app & (rng.random(n) < 0.05))
    yob = np.round(rng.normal(1985.0, 13.0, n))
    yob = np.clip(yob, 1940, 2010)
    yob[rng.random(n) < 0.65] = np.nan
    r["yob"] = yob
    eu = np.isin(
        country, [COUNTRY_CODES.index(c) for c in ("GBR", "DEU", "FRA", "ESP", "ITA", "NLD")]
    )
    r["gdpr"] = eu & (rng.random(n) < 0.97)
    r["coppa"] = rng.random(n) < 0.01
    r["first_price"] = rng.random(n) < np.where(r["exchange"] == 0, 0.95, 0.80)

    country_f = country.astype(np.float64)
    country_f[country_missing] = np.nan
    r["country_code"] = country_f
    return r


def hidden_bid_rule(r: dict[str, np.ndarray]) -> np.ndarray:
    """The DSP's (hidden) bidding rule: bid when estimated value clears the floor."""
    dev, country = r["device_type"], r["country"]
    value = np.full(dev.shape, 0.15)
    value *= np.where(np.isnan(r["country_code"]), 0.6, COUNTRY_TABLE[country, 1])
    value *= EXCHANGE_MULT[r["exchange"]]
    mobile_app_ifa = r["is_app"] & r["has_ifa"] & ((dev == MOBILE) | (dev == TABLET))
    value *= np.where(mobile_app_ifa, 1.6, np.where(r["is_app"], 0.85, 1.0))
    value *= np.where(dev == CTV, 4.5, 1.0)
    seg = r["segments"]
    overlap = seg[:, TARGET_SEGMENTS].sum(axis=1)
    value *= 1.0 + 0.3 * overlap
    value *= np.where(seg[:, 3] & seg[:, 8], 1.4, 1.0)
    value *= np.where(seg[:, 19], 0.7, 1.0)  # a brand-unsafe audience
    hour = r["hour"]
    value *= np.where((hour >= 18) & (hour <= 22), 1.35, 1.0)
    value *= np.where((hour >= 12) & (hour <= 14), 1.1, 1.0)
    value *= np.where((hour >= 1) & (hour <= 5), 0.7, 1.0)
    view = r["viewability"]
    value *= np.where(np.isnan(view), 0.85, 0.4 + np.nan_to_num(view))
    value *= 0.5 + r["pub_quality"]
    value *= AD_SIZE_TABLE[r["ad_size"], 2]
    value *= np.where(r["secure"], 1.0, 0.6)
    cookie = r["cookie_age_days"]
    value *= np.where(np.nan_to_num(cookie, nan=0.0) > 30.0, 1.15, 1.0)

    floor = np.nan_to_num(r["bidfloor"], nan=0.0)
    bid = floor < value
    bid &= r["freq_24h"] < 8
    bid &= ~(np.nan_to_num(r["recency_s"], nan=1e9) < 30.0)
    bid &= ~r["coppa"]
    bid &= ~(r["dnt"] & ~r["is_app"])  # honour Do-Not-Track on web inventory
    return bid


# --------------------------------------------------------------------------- feature encoding


class FeatureMatrix:
    """Collects named columns and their schema entries in order."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.columns: list[np.ndarray] = []
        self.specs: list[dict] = []

    def add(
        self,
        name: str,
        ftype: str,
        source: str,
        values: np.ndarray,
        encoding: dict | None = None,
        missing: bool = False,
    ) -> None:
        col = np.asarray(values, dtype=np.float32)
        assert col.shape == (self.n,), name
        if not missing:
            assert not np.isnan(col).any(), f"{name} has NaN but is declared never-missing"
        spec: dict = {"name": name, "type": ftype, "source": source}
        if encoding is not None:
            spec["encoding"] = encoding
        spec["missing"] = MISSING if missing else None
        self.columns.append(col)
        self.specs.append(spec)

    def matrix(self) -> np.ndarray:
        return np.ascontiguousarray(np.stack(self.columns, axis=1), dtype=np.float32)

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.specs]


def encode(r: dict[str, np.ndarray]) -> FeatureMatrix:
    n = r["exchange"].shape[0]
    fm = FeatureMatrix(n)
    for i, ex in enumerate(EXCHANGES):
        fm.add(f"exchange_{ex}", "one_hot", "ext.exchange", r["exchange"] == i, {"value": ex})
    for i, (dt, codes) in enumerate(DEVICE_TYPES.items()):
        fm.add(
            f"device_type_{dt}",
            "one_hot",
            "device.devicetype",
            r["device_type"] == i,
            {"value": dt, "openrtb_codes": codes},
        )
    for i, os_name in enumerate(OSES):
        enc = {"value": os_name}
        if os_name == "other":
            enc = {"value": "other", "note": "any device.os not listed above"}
        fm.add(f"os_{os_name}", "one_hot", "device.os", r["os"] == i, enc)
    fm.add(
        "country",
        "ordinal",
        "device.geo.country",
        r["country_code"],
        {c: i for i, c in enumerate(COUNTRY_CODES)},
        missing=True,
    )
    fm.add("is_app", "binary", "app", r["is_app"], {"app": 1, "site": 0})
    fm.add("ad_w", "float", "imp.banner.w", AD_SIZE_TABLE[r["ad_size"], 0])
    fm.add("ad_h", "float", "imp.banner.h", AD_SIZE_TABLE[r["ad_size"], 1])
    fm.add(
        "ad_size",
        "ordinal",
        "imp.banner.w x imp.banner.h",
        r["ad_size"],
        {s: i for i, s in enumerate(AD_SIZE_NAMES)},
    )
    fm.add("bidfloor", "float", "imp.bidfloor", r["bidfloor"], missing=True)
    hour = r["hour"].astype(np.float64)
    fm.add("hour", "ordinal", "ext.local_hour", hour, {"range": [0, 23]})
    angle = 2.0 * np.pi * hour / 24.0
    fm.add("hour_sin", "cyclic", "ext.local_hour", np.sin(angle), {"fn": "sin", "period": 24})
    fm.add("hour_cos", "cyclic", "ext.local_hour", np.cos(angle), {"fn": "cos", "period": 24})
    dow_names = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    fm.add(
        "day_of_week", "ordinal", "ext.local_dow", r["dow"], {d: i for i, d in enumerate(dow_names)}
    )
    fm.add("is_weekend", "binary", "ext.local_dow", r["dow"] >= 5, {"sat": 1, "sun": 1})
    for k in range(NUM_SEGMENTS):
        fm.add(
            f"seg_{k:02d}",
            "binary",
            "user.data[].segment[].id",
            r["segments"][:, k],
            {"segment_id": f"seg-{SEGMENT_BASE_ID + k}"},
        )
    fm.add("pub_quality", "float", "(site|app).publisher.ext.quality", r["pub_quality"])
    fm.add("viewability", "float", "imp.ext.viewability", r["viewability"], missing=True)
    fm.add(
        "cookie_age_days", "float", "user.ext.cookie_age_days", r["cookie_age_days"], missing=True
    )
    fm.add("is_https", "binary", "imp.secure", r["secure"])
    fm.add("has_ifa", "binary", "device.ifa", r["has_ifa"], {"present": 1, "absent": 0})
    fm.add("lmt", "binary", "device.lmt", r["lmt"])
    fm.add("dnt", "binary", "device.dnt", r["dnt"])
    fm.add(
        "connection_type",
        "ordinal",
        "device.connectiontype",
        r["connectiontype"],
        dict(CONNECTION_TYPES),
        missing=True,
    )
    fm.add("geo_lat", "float", "device.geo.lat", r["lat"], {"rounded": 2}, missing=True)
    fm.add("geo_lon", "float", "device.geo.lon", r["lon"], {"rounded": 2}, missing=True)
    fm.add("recency_s", "float", "user.ext.recency_s", r["recency_s"], missing=True)
    fm.add("freq_24h", "float", "user.ext.freq_24h", r["freq_24h"])
    fm.add("tmax_ms", "float", "tmax", r["tmax"])
    fm.add("imp_count", "float", "imp (array length)", r["imp_count"])
    fm.add("is_interstitial", "binary", "imp.instl", r["instl"])
    fm.add("user_yob", "float", "user.yob", r["yob"], missing=True)
    fm.add("gdpr", "binary", "regs.ext.gdpr", r["gdpr"])
    fm.add("coppa", "binary", "regs.coppa", r["coppa"])
    fm.add("first_price", "binary", "at", r["first_price"], {"1": 1, "2": 0})
    return fm


# --------------------------------------------------------------------------- metrics / output


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney U statistic, with average ranks for tied scores."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, ends - starts)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def write_sample_csv(path: Path, x: np.ndarray) -> None:
    lines = []
    for row in x:
        lines.append(",".join("" if np.isnan(v) else f"{float(v):.9g}" for v in row))
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / MODEL_NAME)
    ap.add_argument("--rows", type=int, default=200_000, help="training rows (validation: rows/4)")
    ap.add_argument("--seed", type=int, default=7, help="data-generation seed")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    n_train = args.rows
    n_val = max(args.rows // 4, 1000)
    rng = np.random.default_rng(args.seed)
    raw = generate_requests(n_train + n_val, rng)
    clean = hidden_bid_rule(raw)
    flip = rng.random(clean.shape[0]) < 0.10
    label = (clean ^ flip).astype(np.float32)
    fm = encode(raw)
    x = fm.matrix()
    names = fm.names
    x_tr, y_tr = x[:n_train], label[:n_train]
    x_va, y_va = x[n_train:], label[n_train:]
    t_gen = time.perf_counter() - t0
    print(
        f"generated {n_train} train + {n_val} validation rows x {x.shape[1]} features "
        f"in {t_gen:.1f}s; positive rate {label.mean():.3f} (label flips {flip.mean():.3f})"
    )

    ftypes = ["q"] * len(names)
    dtrain = xgb.DMatrix(x_tr, label=y_tr, feature_names=names, feature_types=ftypes, nthread=2)
    dval = xgb.DMatrix(x_va, label=y_va, feature_names=names, feature_types=ftypes, nthread=2)
    t1 = time.perf_counter()
    booster = xgb.train(PARAMS, dtrain, num_boost_round=NUM_TREES)
    t_train = time.perf_counter() - t1

    p_tr = booster.predict(dtrain)
    p_va = booster.predict(dval)
    auc_tr, auc_va = auc(y_tr, p_tr), auc(y_va, p_va)
    auc_clean = auc(clean[n_train:], p_va)
    acc_va = float(((p_va >= THRESHOLD) == (y_va > 0.5)).mean())
    print(
        f"trained {booster.num_boosted_rounds()} trees "
        f"(max_depth {PARAMS['max_depth']}) in {t_train:.1f}s"
    )
    print(
        f"AUC train {auc_tr:.4f}  validation {auc_va:.4f}  "
        f"(validation vs noise-free rule {auc_clean:.4f})"
    )
    print(f"validation accuracy @ {THRESHOLD}: {acc_va:.4f}")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.json"
    booster.save_model(str(model_path))
    schema = {
        "model": MODEL_NAME,
        "objective": OBJECTIVE,
        "threshold": THRESHOLD,
        "features": fm.specs,
    }
    (out / "features.json").write_text(json.dumps(schema, indent=2) + "\n")
    write_sample_csv(out / "sample.csv", x_va[:100])
    size_mb = model_path.stat().st_size / 1e6
    print(f"wrote {model_path} ({size_mb:.2f} MB), features.json, sample.csv")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

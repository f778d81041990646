"""Head v2's λ_max(H): a learned log-space correction to the per-sequence plug-in.

From one capture of ``b`` sequences (`tfeatures.extract`, Monte Carlo labels) the
per-sequence plug-in is ``λ_S = T_eff λ_max(F_S)`` (`TSet.seq_top`). The correction is a
ridge regression on scale-free features ``φ`` of the same gradients:

    log λ̂ = log λ_S + α (c + w · (φ - μ) / σ)

``φ`` (`FEATURES`) holds no width, vocabulary size, depth or parameter count, so that it
means the same on unseen widths and on models built by ``transformers`` (GPT-2, Llama):
``log(λ_tok / tr Ĝ)`` and ``log(λ_S / λ_tok)`` (spectral concentration of the token-level
and per-sequence plug-ins), ``log(tr_S / tr Ĝ)`` (cross-token correlation), the mean loss
over ``log V`` and the loss's coefficient of variation (how far training went), and the
log share of ``tr Ĝ`` of each layer role (attention in/out, MLP in/out, LM head).

`fit_top_correction`: the ridge penalty and the shrink ``α`` are chosen by leave-one-
group-out cross-validation (groups: the training tasks), minimising the out-of-fold mean
``|log λ̂ - log λ|``; ``α = 0`` is the plug-in itself, so a correction that does not carry
over to unseen tasks is switched off.

The 80 % interval is split-conformal on those out-of-fold log residuals ``r``:
``[λ̂ e^{q_lo}, λ̂ e^{q_hi}]`` with ``q_lo, q_hi`` the 10/90 % quantiles of ``r``, either
pooled (``calibration="global"``) or within the bin of the set's training progress
(``"loss-bins"``: tertiles of mean loss / log V over the training sets, a Mondrian split on
an input, never on the truth). `nested_calibration` scores a scheme by leave-one-group-out
*around the whole fit* (penalty, shrink and quantiles refitted without the held group), so
its coverage is that of sets the calibration never saw. ``clip=True`` clamps ``φ`` to the
training range before the correction (no extrapolation on unseen architectures).

The per-family term (v2.2, ``family_term=True``): ``φ`` is extended by indicators of the
model family (`FAMILIES`: ``tiny`` the reference, ``gpt2``, ``llama``), standardised and
penalised like the rest, so each family gets its own offset where the training groups of
that family support one. The family comes from the checkpoint's own structure
(`tfeatures.model_family`), never from a name the user gives. A set of another family (or
one whose structure and config disagree) gets the indicators' training means (``z = 0``:
the average family's offset) and is flagged out of range. ``calibration="family-bins"``
takes the conformal quantiles within the set's family (Mondrian on family); an unknown
family falls back to the pooled quantiles.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gmcurv.data import DataSample
from gmcurv.gradmetanet.predict import sample_batch
from gmcurv.gradmetanet.tfeatures import ROLES, TSet, extract, global_features, model_family
from gmcurv.objective import Objective

FEATURES = (
    "log_tok_top_over_trace",
    "log_seq_top_over_tok_top",
    "loss_over_log_vocab",
    "loss_cv",
    *(f"log_share_{r}" for r in ROLES),
    "log_seq_trace_over_tok_trace",
)
SHARE_FLOOR = 1e-6
PENALTIES = (0.03, 0.1, 0.3, 1.0, 3.0)
SHRINKS = tuple(k / 10 for k in range(11))
CALIBRATIONS = ("global", "loss-bins")
FAMILY_CALIBRATION = "family-bins"  # needs per-set families (`fit_top_correction`)
ALL_CALIBRATIONS = (*CALIBRATIONS, FAMILY_CALIBRATION)
BIN_FEATURE = FEATURES.index("loss_over_log_vocab")
FAMILIES = ("tiny", "gpt2", "llama")  # `tfeatures.model_family`; the first is the reference


def family_indicators(family: str | None, families: list[str]) -> list[float] | None:
    """Indicators of ``family`` for ``families[1:]`` (all zero: the reference
    ``families[0]``); None for a family outside ``families`` (unknown)."""
    if family not in families:
        return None
    return [float(family == f) for f in families[1:]]


def scale_free_features(
    g: Tensor, layer_log_shares: list[tuple[int, float]], seq_trace: float, plug_trace: float
) -> list[float]:
    """``φ`` (`FEATURES`) from `global_features` ``g``, each layer's ``(role index, log
    share of tr Ĝ)`` and the per-sequence / token-level traces."""
    shares = [0.0] * len(ROLES)
    for r, ls in layer_log_shares:
        shares[r] += math.exp(ls)
    return [
        float(g[1]),
        float(g[2]),
        float(g[5]),
        float(g[4]) / max(float(g[3]), 1e-3),
        *(math.log(s + SHARE_FLOOR) for s in shares),
        math.log(max(seq_trace, 1e-300) / max(plug_trace, 1e-300)),
    ]


def tset_features(s: TSet) -> list[float]:
    """``φ`` of a captured set (as `HeadV2Input.from_tset` computes its layer shares)."""
    tr = s.plug_trace
    shares = [
        (ROLES.index(layer.role), math.log(float(layer.sq_norms.mean()) / max(tr, 1e-300) + 1e-12))
        for layer in s.layers
    ]
    return scale_free_features(global_features(s), shares, s.seq_trace, tr)


@dataclass(frozen=True)
class TopCorrection:
    """The fitted correction (module doc); `interval` = out-of-fold 10/90 % log quantiles."""

    mean: list[float]
    scale: list[float]
    weights: list[float]
    intercept: float
    shrink: float
    penalty: float
    interval: tuple[float, float]  # pooled out-of-fold log quantiles
    level: float = 0.8
    cv_error: float = float("nan")  # out-of-fold mean |log| error at the chosen (penalty, α)
    cv_error_plugin: float = float("nan")
    trained_on: dict = field(default_factory=dict)  # feature ranges, b, tokens, families
    calibration: str = "global"
    bin_edges: list[float] = field(default_factory=list)  # on φ[BIN_FEATURE] ("loss-bins")
    bin_intervals: list[list[float]] = field(default_factory=list)  # per bin (lo, hi)
    clip_lo: list[float] = field(default_factory=list)  # φ clamped to these (clip=True)
    clip_hi: list[float] = field(default_factory=list)
    robust: bool = False  # fitted with Huber's loss (`_ridge`); provenance only
    families: list[str] = field(default_factory=list)  # family term: indicators of [1:]
    family_intervals: dict[str, list[float]] = field(default_factory=dict)  # "family-bins"

    def _clipped(self, phi: list[float]) -> list[float]:
        if not self.clip_lo:
            return list(phi)
        return [min(max(p, a), b) for p, a, b in zip(phi, self.clip_lo, self.clip_hi, strict=True)]

    def knows(self, family: str | None) -> bool:
        """Whether ``family`` is one this correction was fitted on (always true without a
        family term or family bins)."""
        uses = self.families or self.family_intervals
        return not uses or family in (self.families or list(self.family_intervals))

    def design(self, phi: list[float], family: str | None = None) -> list[float]:
        """``φ`` (clipped if fitted so) with the family indicators appended (an unknown
        family: their training means, i.e. ``z = 0``)."""
        x = self._clipped(phi)
        if not self.families:
            return x
        ind = family_indicators(family, self.families)
        return x + (ind if ind is not None else self.mean[len(FEATURES) :])

    def log_ratio(self, phi: list[float], family: str | None = None) -> float:
        x = self.design(phi, family)
        z = [(p - m) / s for p, m, s in zip(x, self.mean, self.scale, strict=True)]
        return self.shrink * (
            self.intercept + sum(w * x for w, x in zip(self.weights, z, strict=True))
        )

    def log_interval(self, phi: list[float], family: str | None = None) -> tuple[float, float]:
        """The log quantiles ``(q_lo, q_hi)`` that apply to a set with features ``φ`` (and
        ``family``, for family bins; an unknown family gets the pooled quantiles)."""
        if self.family_intervals:
            lo, hi = self.family_intervals.get(family or "", self.interval)
            return lo, hi
        if not self.bin_edges:
            return self.interval
        k = sum(phi[BIN_FEATURE] > e for e in self.bin_edges)
        lo, hi = self.bin_intervals[k]
        return lo, hi

    def predict(
        self, seq_top: float, phi: list[float], family: str | None = None
    ) -> tuple[float, float, float]:
        """``(λ̂, lo, hi)`` from the per-sequence plug-in, ``φ`` and the model family."""
        lam = seq_top * math.exp(self.log_ratio(phi, family))
        lo, hi = self.log_interval(phi, family)
        return lam, lam * math.exp(lo), lam * math.exp(hi)

    def to_dict(self) -> dict:
        return {**self.__dict__, "features": list(FEATURES), "interval": list(self.interval)}

    @classmethod
    def from_dict(cls, d: dict) -> TopCorrection:
        if list(d.get("features", [])) != list(FEATURES):
            raise ValueError("the λ_max correction was fitted on other features")
        keep = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        keep["interval"] = tuple(keep["interval"])
        return cls(**keep)


HUBER_K = 1.345  # Huber's constant: 95 % efficiency under Gaussian residuals
HUBER_ITERS = 30


def _ridge(
    X: Tensor, y: Tensor, penalty: float, robust: bool = False
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Standardised ridge: ``min_{c,w} Σ_i ρ(y_i - c - z_i·w) / n + penalty |w|²`` with
    ``ρ(r) = r²`` or, ``robust``, Huber's ``ρ`` at ``HUBER_K`` times the residuals' MAD
    scale (iteratively reweighted least squares; the intercept is not penalised)."""
    mu = X.mean(0)
    sd = X.std(0, unbiased=False) + 1e-9
    Z = (X - mu) / sd
    n, p = Z.shape
    u = torch.ones(n, dtype=Z.dtype)
    c, w = float(y.mean()), torch.zeros(p, dtype=Z.dtype)
    for _ in range(HUBER_ITERS if robust else 1):
        sw = u.sum()
        zc = (u @ Z) / sw
        c0 = float(u @ y / sw)
        Zc, yc = Z - zc, y - c0
        A = (Zc * u[:, None]).T @ Zc + penalty * sw * torch.eye(p, dtype=Z.dtype)
        w_new = torch.linalg.solve(A, (Zc * u[:, None]).T @ yc)
        c_new = c0 - float(zc @ w_new)
        done = float((w_new - w).abs().max()) < 1e-10 and abs(c_new - c) < 1e-10
        w, c = w_new, c_new
        if not robust or done:
            break
        r = y - c - Z @ w
        scale = 1.4826 * float((r - r.median()).abs().median()) + 1e-12
        u = torch.clamp(HUBER_K * scale / r.abs().clamp_min(1e-300), max=1.0)
    return mu, sd, w, c


def _clamp(X: Tensor, ref: Tensor) -> Tensor:
    return torch.maximum(torch.minimum(X, ref.max(0).values), ref.min(0).values)


def _out_of_fold(
    X: Tensor, y: Tensor, groups: list[str], penalty: float, clip: bool = False,
    robust: bool = False,
) -> Tensor:  # fmt: skip
    pred = torch.zeros_like(y)
    for g in sorted(set(groups)):
        held = torch.tensor([x == g for x in groups])
        mu, sd, w, c = _ridge(X[~held], y[~held], penalty, robust)
        Xh = _clamp(X[held], X[~held]) if clip else X[held]
        pred[held] = c + ((Xh - mu) / sd) @ w
    return pred


def _quantile(x: Tensor, q: float) -> float:
    return float(torch.quantile(x, q))


def conformal_ranks(n: int, level: float) -> tuple[int, int]:
    """The 1-based order statistics ``(k_lo, k_hi)`` of `conformal_interval` for ``n``
    residuals: ``⌊a(n+1)⌋`` and ``⌈(1-a)(n+1)⌉`` with ``a = (1 - level)/2``, clamped to
    ``1..n`` (the extreme residual where ``n`` is too small)."""
    if n < 1:
        raise ValueError("a conformal interval needs at least one residual")
    a = (1 - level) / 2
    k_lo = max(math.floor(a * (n + 1) + 1e-9), 1)  # 1e-9: 0.9 * 100 is 90.00000000000001
    k_hi = min(math.ceil((1 - a) * (n + 1) - 1e-9), n)
    return k_lo, k_hi


def conformal_coverage(n: int, level: float) -> float:
    """Exact coverage of `conformal_interval` for a new residual exchangeable with ``n``
    continuous ones: its rank among the ``n + 1`` is uniform, and it lies between the
    ``k_lo``-th and ``k_hi``-th order statistics of the other ``n`` with probability
    ``(k_hi - k_lo) / (n + 1)`` (``>= level`` whenever ``n >= 2/(1-level) - 1``)."""
    k_lo, k_hi = conformal_ranks(n, level)
    return (k_hi - k_lo) / (n + 1)


def conformal_interval(resid: Tensor, level: float) -> tuple[float, float]:
    """Split-conformal log quantiles of residuals ``r``: the `conformal_ranks` order
    statistics (finite-sample coverage `conformal_coverage` >= ``level`` for an
    exchangeable new residual)."""
    r = resid.sort().values
    k_lo, k_hi = conformal_ranks(len(r), level)
    return float(r[k_lo - 1]), float(r[k_hi - 1])


def fit_top_correction(
    phi: list[list[float]],
    log_ratio: list[float],
    groups: list[str],
    level: float = 0.8,
    trained_on: dict | None = None,
    calibration: str = "global",
    clip: bool = False,
    robust: bool = False,
    family: list[str] | None = None,
    family_term: bool = False,
) -> TopCorrection:
    """Fit on ``log(λ / λ_S)`` of training sets; penalty and shrink by leave-one-group-out
    CV, interval by ``calibration`` on its out-of-fold residuals (module doc). ``family``:
    each set's model family (`FAMILIES`), needed by ``family_term`` (indicators appended to
    ``φ``) and by ``"family-bins"``. Needs at least two groups."""
    if len(set(groups)) < 2:
        raise ValueError("cross-validation needs sets from at least two groups")
    if calibration not in ALL_CALIBRATIONS:
        raise ValueError(f"calibration must be one of {ALL_CALIBRATIONS}, got {calibration!r}")
    if (family_term or calibration == FAMILY_CALIBRATION) and family is None:
        raise ValueError("a family term or family bins need each set's family")
    fams = [f for f in FAMILIES if f in set(family)] if family_term and family else []
    if family is not None and not set(family) <= set(FAMILIES):
        raise ValueError(f"families must be among {FAMILIES}, got {sorted(set(family))}")
    if fams:
        phi = [
            list(p) + (family_indicators(f, fams) or []) for p, f in zip(phi, family, strict=True)
        ]
    X = torch.tensor(phi, dtype=torch.float64)
    y = torch.tensor(log_ratio, dtype=torch.float64)
    best = None
    for pen in PENALTIES:
        oof = _out_of_fold(X, y, groups, pen, clip, robust)
        for a in SHRINKS:
            err = float((y - a * oof).abs().mean())
            if best is None or err < best[0] - 1e-12:
                best = (err, pen, a, y - a * oof)
    assert best is not None
    err, pen, a, resid = best
    mu, sd, w, c = _ridge(X, y, pen, robust)
    edges: list[float] = []
    per_bin: list[list[float]] = []
    if calibration == "loss-bins":
        v = X[:, BIN_FEATURE]
        edges = [_quantile(v, 1 / 3), _quantile(v, 2 / 3)]
        k = (v.unsqueeze(1) > torch.tensor(edges, dtype=v.dtype)).sum(1)
        per_bin = [list(conformal_interval(resid[k == b], level)) for b in range(3)]
    fam_iv: dict[str, list[float]] = {}
    if calibration == FAMILY_CALIBRATION:
        assert family is not None
        for f in sorted(set(family)):
            sel = torch.tensor([x == f for x in family])
            fam_iv[f] = list(conformal_interval(resid[sel], level))
    n_phi = X.shape[1] - max(len(fams) - 1, 0)  # clip φ only, never the indicators
    return TopCorrection(
        mean=mu.tolist(),
        scale=sd.tolist(),
        weights=w.tolist(),
        intercept=c,
        shrink=a,
        penalty=pen,
        interval=conformal_interval(resid, level),
        level=level,
        cv_error=err,
        cv_error_plugin=float(y.abs().mean()),
        trained_on=trained_on or {},
        calibration=calibration,
        bin_edges=edges,
        bin_intervals=per_bin,
        clip_lo=X[:, :n_phi].min(0).values.tolist() if clip else [],
        clip_hi=X[:, :n_phi].max(0).values.tolist() if clip else [],
        robust=robust,
        families=fams,
        family_intervals=fam_iv,
    )


@dataclass(frozen=True)
class NestedScore:
    """A whole fit scored on groups it never saw (`nested_calibration`)."""

    error: float  # mean |log λ̂ - log λ| over every held-out set
    coverage: float  # share of held-out sets inside their interval
    width: float  # mean interval width in log units
    per_group: dict[str, tuple[float, float]]  # group -> (error, coverage)
    per_set: dict[int, tuple[float, bool]] = field(default_factory=dict)  # i -> (|r|, in)


def nested_calibration(
    phi: list[list[float]],
    log_ratio: list[float],
    groups: list[str],
    outer: list[str] | None = None,
    level: float = 0.8,
    calibration: str = "global",
    clip: bool = False,
    robust: bool = False,
    family: list[str] | None = None,
    family_term: bool = False,
    folds: set[str] | None = None,
) -> NestedScore:
    """Leave one ``outer`` group out (default: ``groups``) around the whole
    `fit_top_correction` (its inner CV over ``groups`` included), predict the held group:
    the error, coverage and width a new group would see. ``folds``: hold out only these
    ``outer`` labels (the rest always train; scores are over the held ones). Needs three
    ``groups``."""
    outer = groups if outer is None else outer
    errs: list[float] = []
    cov: list[float] = []
    wid: list[float] = []
    per: dict[str, tuple[float, float]] = {}
    per_set: dict[int, tuple[float, bool]] = {}
    for g in sorted(set(outer) if folds is None else set(folds) & set(outer)):
        keep = [i for i, o in enumerate(outer) if o != g]
        held = [i for i, o in enumerate(outer) if o == g]
        c = fit_top_correction(
            [phi[i] for i in keep], [log_ratio[i] for i in keep], [groups[i] for i in keep],
            level, calibration=calibration, clip=clip, robust=robust,
            family=None if family is None else [family[i] for i in keep],
            family_term=family_term,
        )  # fmt: skip
        e_g, c_g = [], []
        for i in held:
            f = None if family is None else family[i]
            r = log_ratio[i] - c.log_ratio(phi[i], f)
            lo, hi = c.log_interval(phi[i], f)
            e_g.append(abs(r))
            c_g.append(float(lo <= r <= hi))
            wid.append(hi - lo)
            per_set[i] = (abs(r), lo <= r <= hi)
        errs += e_g
        cov += c_g
        per[g] = (sum(e_g) / len(e_g), sum(c_g) / len(c_g))
    n = len(errs)
    return NestedScore(sum(errs) / n, sum(cov) / n, sum(wid) / n, per, per_set)


@dataclass(frozen=True)
class TopPrediction:
    """λ_max(H) from head v2's correction on ``b`` sequences, with what it corrected."""

    value: float
    interval: tuple[float, float]
    level: float
    plugin_seq: float  # T_eff λ_max(F_S): the per-sequence plug-in it corrects
    plugin_tok: float  # λ_max(Ĝ): the token-level plug-in from the same gradients
    b: int
    n: int
    tokens: float
    seconds: float
    out_of_range: list[tuple[str, float, tuple[float, float]]]  # (what, value, trained range)
    family: str | None = None  # `tfeatures.model_family` of the model (None: unknown)


def predict_top(
    objective: Objective, data: DataSample, corr: TopCorrection, seed: int = 0
) -> TopPrediction:
    """One capture of ``b`` random sequences of `data` (``b`` as in training, Monte Carlo
    labels, seeded), the correction (with the family read from the model's structure), and
    every input outside its training range; a family that is not one of `FAMILIES`, or not
    one the correction was fitted on, is flagged with value NaN (module doc: its
    fallback)."""
    t0 = time.perf_counter()
    b = int(corr.trained_on.get("b", 16))
    batch, _ = sample_batch(data, b, seed, objective.device, objective.dtype)
    s = extract(objective, batch, seed=seed)
    phi = tset_features(s)
    family = model_family(objective.model)
    lam, lo, hi = corr.predict(s.seq_top, phi, family)
    flags: list[tuple[str, float, tuple[float, float]]] = []
    if family is None or not corr.knows(family):
        known = ", ".join(corr.families or list(corr.family_intervals) or FAMILIES)
        fallback = (
            "the average family's offset and the pooled interval are used"
            if corr.families or corr.family_intervals
            else "measured on those only"
        )
        what = f"model family {family or 'unknown'} (trained on {known}: {fallback})"
        flags.append((what, math.nan, (math.nan, math.nan)))
    for name, v in zip(FEATURES, phi, strict=True):
        rng = corr.trained_on.get("feature_ranges", {}).get(name)
        if rng is not None and not rng[0] <= v <= rng[1]:
            flags.append((name, v, (rng[0], rng[1])))
    t_tr = float(corr.trained_on.get("tokens", s.tokens + 1)) - 1
    if not 0.5 * t_tr <= s.tokens <= 2 * t_tr:
        flags.append(("predicted tokens per sequence", s.tokens, (t_tr, t_tr)))
    if s.b < b:
        flags.append(("sequences", float(s.b), (float(b), float(b))))
    return TopPrediction(
        lam, (lo, hi), corr.level, s.seq_top, s.plug_top, s.b, data.n, s.tokens,
        time.perf_counter() - t0, flags, family,
    )  # fmt: skip
